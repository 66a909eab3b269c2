"""further_pt: further pretraining (ITPT / IDPT / CDPT) and fine-tuning of BERT-style encoders.

Stages, one module each, in the order data flows: config/schemas (recipes) ->
corpus -> instances -> masking -> objective -> training (what both loops share)
-> checkpoint -> pretrain (script); classification_data -> schedules ->
layerwise -> heads -> finetune (script) -> evaluation -> experiment -> report.
The README's "Code map" says what each holds.
"""

__version__ = "0.1.0"
