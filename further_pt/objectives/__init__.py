"""Objectives: what a run optimises. Each is a model, a loss and a metric.

:mod:`.base` is the interface the Trainer runs; :mod:`.masked_lm` (MLM + optional NSP) and
:mod:`.classification` (fine-tuning with the papers' strategies) implement it, from the
encoders of :mod:`.encoder`, the heads of :mod:`.heads` and :mod:`.mlm_loss`, the learning
rates of :mod:`.schedules` and :mod:`.layerwise`, and the metrics of :mod:`.evaluation`.
Objectives read data through :mod:`further_pt.data`; they never run a loop.
"""
