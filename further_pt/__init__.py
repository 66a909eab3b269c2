"""further_pt: further pretraining (ITPT / IDPT / CDPT) and fine-tuning of BERT-style encoders.

Stages, one module each, in pipeline order: config (recipes) -> corpus ->
instances -> masking -> objective -> training (shared loop pieces) ->
checkpoint -> pretrain (the entry script).
"""

__version__ = "0.1.0"
