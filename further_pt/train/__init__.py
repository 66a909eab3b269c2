"""Train: the one loop every objective runs in, and what it is made of.

:mod:`.trainer` reads top to bottom; the step (:mod:`.step`), checkpoints
(:mod:`.checkpoint`, :mod:`.output_dir`), processes and devices (:mod:`.launch`,
:mod:`.hardware`, :mod:`.gpu_driver`), logging (:mod:`.metrics_log`) and fault injection
(:mod:`.faults`) are its collaborators, each testable alone.
"""
