"""further_pt: further pretraining (ITPT / IDPT / CDPT) and fine-tuning of BERT-style encoders.

One package per stage, imports pointing down the pipeline (tests/test_imports.py):
``config`` (recipes) -> ``data`` (corpora, instances, masking, labelled tasks) ->
``objectives`` (masked LM, classification: a model, a loss, a metric) -> ``train`` (the one
Trainer) -> the entry scripts ``pretrain.py`` / ``finetune.py`` -> ``study`` (the experiment
and its report) -> ``cli`` (the ``further-pt`` command). docs/contributing/code-map.md says
what each module holds.
"""

__version__ = "0.1.0"
