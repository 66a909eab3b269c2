"""What the standard classes see in a saved classifier folder: the custom head, or a refusal.

A custom head (:mod:`further_pt.objectives.heads`: another pooling, layer selection,
segments, several tasks) lives in ``head.safetensors`` beside a standard Hugging Face
folder whose own head (``classifier.*``) never trained. Loaded as it is,
``AutoModelForSequenceClassification`` and ``pipeline("text-classification")`` would run
that untrained head without a warning and predict noise. So every folder is saved one of
two ways:

- the standard head can compute the custom one exactly (BERT's ``pooler`` pooling: the
  pooler output, dropout, one linear layer, which is what ``BertForSequenceClassification``
  does): the trained weights are written into ``classifier.*``, so the standard loaders
  predict what further_pt predicts. Checked on the model itself (both forwards on a probe
  batch), not assumed from a table of architectures;
- otherwise ``config.json`` carries ``attn_implementation`` set to :data:`REFUSAL`. It is
  the one field of a config that transformers 5 reads when it builds a model of any class
  and refuses, echoing the value, when it is none it knows; ``AutoConfig`` and
  ``AutoTokenizer`` still read the folder. (transformers offers no field meant for this:
  an unknown ``model_type`` fails with a message about updating transformers, ``auto_map``
  is ignored for built-in model types, a bad ``problem_type`` or ``quantization_config``
  loads anyway.) further_pt's own loader clears the field (:func:`loadable_config`).

Passing ``attn_implementation=`` to ``from_pretrained`` overrides the field and loads the
encoder with the untrained standard head: the refusal guards the default call, which is
what ``pipeline()`` and the Hub make.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig

#: config.json's ``attn_implementation`` in a folder the standard classes cannot run; they
#: print it inside ``Specified `attn_implementation="..."` is not supported``. No slash:
#: transformers would take ``owner/name`` for a kernel to fetch from the Hub.
REFUSAL = ("NOT LOADABLE BY TRANSFORMERS ALONE - a further_pt custom head: this folder's "
           "classifier is head.safetensors, which AutoModelForSequenceClassification and "
           "pipeline() cannot run (they would predict with an untrained head). Load it with "
           "further-pt predict model=FOLDER input=FILE output=FILE, or in Python with "
           "further_pt.objectives.heads.load_classifier(FOLDER)")
_PROBE = (2, 8)  # (rows, tokens) of the probe batch


def standard_state(classifier: Any) -> dict[str, torch.Tensor] | None:
    """The HF model's state dict with the custom head in ``classifier.*``, if the standard head
    then computes exactly what the custom one does; None when it cannot.

    Only a single linear head on an unsegmented input can be carried over; whether the
    model's own head applies it to the same vector (the pooler output) is tested by running
    both on a probe batch of random ids (in eval mode; the training mode is restored, the
    global RNG untouched, nothing in the model changes).
    """
    model = classifier.model
    heads = list(classifier.heads.values())
    own = getattr(model, "classifier", None)
    if (classifier.hierarchical or len(heads) != 1 or not isinstance(own, nn.Linear)
            or own.weight.shape != heads[0].weight.shape or heads[0].bias is None):
        return None
    swap = {"classifier.weight": heads[0].weight.detach(),
            "classifier.bias": heads[0].bias.detach()}
    device = own.weight.device
    ids = torch.randint(0, model.config.vocab_size, _PROBE,
                        generator=torch.Generator().manual_seed(0)).to(device)
    was_training = classifier.training
    classifier.eval()
    try:
        with torch.no_grad():
            custom = classifier.forward(ids)  # forward: not a torch.compile'd call
            standard = torch.func.functional_call(model, swap, (), {"input_ids": ids}).logits
    finally:
        classifier.train(was_training)
    if not torch.allclose(custom.float(), standard.float(), rtol=1e-4, atol=1e-5):
        return None
    return {**model.state_dict(), **swap}


def refuse_standard_loaders(folder: Path) -> None:
    """Mark ``folder/config.json`` so that the standard model classes refuse it (see above)."""
    path = folder / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["attn_implementation"] = REFUSAL
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def refused(folder: str | Path) -> bool:
    """Whether ``folder`` was saved with a custom head the standard classes cannot run."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return False
    return _marked(json.loads(path.read_text(encoding="utf-8")).get("attn_implementation"))


def loadable_config(folder: str | Path, **kwargs: Any) -> PretrainedConfig:
    """``folder``'s config without the refusal: attention chosen as for any model."""
    config = AutoConfig.from_pretrained(folder, **kwargs)
    if _marked(config._attn_implementation):
        config._attn_implementation = None
    return config


def _marked(attn_implementation: Any) -> bool:
    """A refusal, of this version's wording or another's (no attention kernel names further_pt)."""
    return isinstance(attn_implementation, str) and "further_pt" in attn_implementation
