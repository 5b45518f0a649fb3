#!/usr/bin/env bash
# The MLflow tracking server of a cluster's head node (ray_cluster.yaml), with MLflow's basic
# authentication on: every request needs a user and password, so a process that reaches the port
# can neither read nor overwrite runs and registered models without them. Clients (the driver,
# the training workers, `idml serve`) pass the same MLFLOW_TRACKING_USERNAME/PASSWORD variables
# MLflow's client reads.
#
# usage: MLFLOW_TRACKING_PASSWORD=... scripts/mlflow_server.sh HOST PORT BACKEND_STORE_URI ARTIFACTS_DESTINATION
# HOST: the head's private address (never 0.0.0.0 on a machine with a public interface).
set -euo pipefail
if [ $# -ne 4 ]; then
  echo "usage: MLFLOW_TRACKING_PASSWORD=... $0 HOST PORT BACKEND_STORE_URI ARTIFACTS_DESTINATION" >&2
  exit 2
fi
host=$1 port=$2 backend=$3 artifacts=$4
: "${MLFLOW_TRACKING_PASSWORD:?set MLFLOW_TRACKING_PASSWORD: the admin password, which clients use too}"
user=${MLFLOW_TRACKING_USERNAME:-admin}
state=${IDML_MLFLOW_AUTH_DIR:-$HOME/.idml/mlflow-auth}  # the user store; keep it with the backend store
mkdir -p "$state"
chmod 700 "$state"
# The admin user is created from MLFLOW_AUTH_ADMIN_PASSWORD the first time the server starts
# against an empty user store; users without a grant get no access to others' experiments.
cat > "$state/basic_auth.ini" <<INI
[mlflow]
default_permission = NO_PERMISSIONS
database_uri = sqlite:///$state/basic_auth.db
admin_username = $user
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
# The key that signs the auth app's CSRF tokens: made once, kept with the user store.
if [ ! -s "$state/secret_key" ]; then
  (umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$state/secret_key")
fi
export MLFLOW_FLASK_SERVER_SECRET_KEY=$(cat "$state/secret_key")
export MLFLOW_AUTH_CONFIG_PATH=$state/basic_auth.ini MLFLOW_AUTH_ADMIN_PASSWORD=$MLFLOW_TRACKING_PASSWORD
exec mlflow server --app-name basic-auth --host "$host" --port "$port" \
  --backend-store-uri "$backend" --artifacts-destination "$artifacts"
