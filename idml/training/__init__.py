"""Training a model, and evaluating the checkpoint it writes, without Ray (``pipelines.train``
runs the same loop on Ray Train workers):

- ``setup.py``: what a run is made of (``build_training``: model, objective, optimizer, scheduler)
- ``objective.py``: the training objective (mixup, the introspective loss, the uncertainty head's)
- ``loop.py``: the one epoch loop (``fit``, ``Hooks``), checkpoints, the end-of-run evaluation
- ``local.py``: the local runner (``idml train``): a class-balanced DataLoader and ``fit``
- ``evaluate.py``: the ``idml eval`` workflow (a checkpoint on one split)
"""
