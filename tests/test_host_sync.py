"""No host sync in a training step, proved on CPUs (issue 27 item 2).

On a GPU a Python read of a device tensor (``.item()``, ``bool(t)``, ``.tolist()``) waits for
every queued kernel: the step stops overlapping with the next batch's preparation. On a CPU
the same reads are calls of the same Python methods, so patching them to record where they
happen finds every one. Three proofs: a whole pretraining step (batch copy, forward, loss,
backward, optimizer step, bookkeeping) reads nothing back; the whole forward + loss of a
packed batch compiles as one graph; masking runs in the DataLoader workers, from seeds that
make a resumed run mask as the uninterrupted one.
"""

from __future__ import annotations

import traceback
from pathlib import Path

import datasets
import pytest
import torch
from helpers import pretrain_overrides

from further_pt import pretrain
from further_pt.data import masking, order
from further_pt.objectives.base import Stream
from further_pt.objectives.masked_lm import MaskedLM
from further_pt.train import batches as batches_module
from further_pt.train import metrics_log
from further_pt.train import step as step_module

HOST_READS = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "cpu",
              "numpy")


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def _guard(monkeypatch) -> tuple[list[str], dict[str, bool]]:
    """Record every host read made while ``armed``: from the forward of a micro-batch to the
    read of the next one, except where the loop reads the device on purpose (the log and
    checkpoint steps: ``NonfiniteSteps.read``, ``Window.values``)."""
    found: list[str] = []
    armed = {"on": False}

    def patched(name: str):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            if armed["on"]:
                frame = next(f for f in reversed(traceback.extract_stack()[:-1])
                             if "further_pt/" in f.filename or "transformers/" in f.filename)
                found.append(f"{name} at {frame.filename.split('site-packages/')[-1]}:"
                             f"{frame.lineno} ({frame.line})")
            return original(self, *args, **kwargs)
        return read

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, patched(name))

    def arming(owner, attr: str, on: bool) -> None:
        original = getattr(owner, attr)

        def wrapper(*args, **kwargs):
            armed["on"] = on
            return original(*args, **kwargs)
        monkeypatch.setattr(owner, attr, wrapper)

    arming(MaskedLM, "loss", True)  # the batch is on the device: the step begins
    arming(batches_module.Batches, "next", False)  # the next batch: host work by design
    arming(step_module.NonfiniteSteps, "read", False)  # log/checkpoint steps read on purpose
    arming(metrics_log.Window, "values", False)
    return found, armed


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_pretraining_step_reads_nothing_back_from_the_device(
        monkeypatch, tmp_path: Path, corpus_file: Path, tiny_model_dir: Path,
        attention: str) -> None:
    """Packed MLM blocks have no padding: the batch goes without its attention mask, so
    transformers' mask code never asks the device whether the mask is all ones
    (``padding_mask.all()`` in ``_ignore_bidirectional_mask_sdpa``, reached from BERT's
    bidirectional mask for sdpa and eager attention alike)."""
    found, _ = _guard(monkeypatch)
    args = pretrain_overrides(
        tmp_path / "run", corpus_file, tiny_model_dir, tmp_path / "cache",
        **{"objective.nsp": "false", "model.attn_implementation": attention,
           "train.max_steps": 4, "train.log_every_steps": 4, "checkpoint.every_steps": 4,
           "train.gradient_accumulation_steps": 2, "data.dataloader_workers": 0})
    assert pretrain.main(args) == 0
    assert (tmp_path / "run" / "final" / "config.json").is_file()
    assert found == [], "\n".join(found)


def test_a_padded_batch_keeps_its_mask_and_counts_its_real_tokens() -> None:
    full = {"input_ids": torch.ones(2, 4, dtype=torch.long),
            "attention_mask": torch.ones(2, 4, dtype=torch.long)}
    batch, tokens = batches_module.host_side(full)
    assert "attention_mask" not in batch and tokens == 8
    padded = {**full, "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])}
    batch, tokens = batches_module.host_side(padded)
    assert batch["attention_mask"] is padded["attention_mask"] and tokens == 6


def test_on_cuda_a_batch_not_yet_pinned_is_pinned_for_the_asynchronous_copy(monkeypatch) -> None:
    """A streamed corpus is collated outside the DataLoader's pin_memory: pinned here, once."""
    pinned: list[int] = []
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self: self.dtype == torch.float32)
    monkeypatch.setattr(torch.Tensor, "pin_memory",
                        lambda self: pinned.append(self.numel()) or self.clone())
    batch = {"input_ids": torch.ones(2, 4, dtype=torch.long),
             "attention_mask": torch.ones(2, 4, dtype=torch.long),
             "weights": torch.ones(3)}  # float32: "already pinned" here
    out, tokens = batches_module.host_side(batch, pin=True)
    assert sorted(pinned) == [8, 8] and tokens == 8 and set(out) == {"input_ids", "weights"}
    assert out["weights"] is batch["weights"]
    pinned.clear()
    batches_module.host_side(batch, pin=False)  # a CPU run pins nothing
    assert pinned == []


def test_forward_and_loss_of_a_packed_batch_compile_as_one_graph() -> None:
    """The whole training forward - embeddings, attention without a mask, dropout, the sparse
    MLM head, the loss - as one fullgraph compile: no graph break (a host read breaks it)
    and no data-dependent shape; the graph's loss equals the eager one's."""
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols
    from transformers import BertConfig, BertForMaskedLM

    from further_pt.objectives.mlm_loss import PretrainingObjective

    graphs: list[list[str]] = []
    data_dependent: list[str] = []

    def inspect_graph(gm, example_inputs):
        graphs.append([getattr(node.target, "__name__", str(node.target))
                       for node in gm.graph.nodes if node.op == "call_function"])
        for node in gm.graph.nodes:
            value = node.meta.get("example_value")
            if isinstance(value, torch.Tensor) and free_unbacked_symbols(value.shape):
                data_dependent.append(node.format_node())
        return gm.forward

    torch.manual_seed(0)
    vocab = 100
    net = BertForMaskedLM(BertConfig(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=40, attn_implementation="sdpa"))
    objective = PretrainingObjective(net, nsp=False, max_predictions=6).train()
    compiled = torch.compile(objective, fullgraph=True, backend=inspect_graph, dynamic=False)
    rows = [list(range(5, 37)) for _ in range(4)]  # packed: every row full, no padding
    collate = masking.MaskingCollate(
        pad_id=0, pad_to_multiple_of=None, seed=1, rank=0,
        special_ids=torch.tensor([0, 1, 2, 3, 4]), mask_token_id=4, vocab_size=vocab,
        masked_lm_prob=0.15, max_predictions=6, continuation=None, strategy="token",
        span_p=0.2, span_max_length=10)
    batch = collate(order.Rows([{"input_ids": r} for r in rows], epoch=0, position=0))
    batch, _ = batches_module.host_side(batch)
    assert "attention_mask" not in batch
    args = (batch["input_ids"], None, batch["token_type_ids"], batch["labels"])
    torch.manual_seed(3)
    eager = objective(*args)
    torch.manual_seed(3)
    graph = compiled(*args)
    assert len(graphs) == 1, [len(g) for g in graphs]  # one graph: the model and the loss
    ops = graphs[0]
    assert {"embedding", "scaled_dot_product_attention", "dropout", "cross_entropy"} <= set(
        ops), sorted(set(ops))
    assert ops.count("scaled_dot_product_attention") == 2  # both layers, no mask built
    assert not data_dependent, data_dependent
    assert abs(eager.total.item() - graph.total.item()) < 1e-6
    print(f"one graph of {len(ops)} ops; loss eager {eager.total.item():.6f} "
          f"graph {graph.total.item():.6f}")


def _stream_batches(workers: int, collate, start: int, count: int) -> list[dict]:
    data = datasets.Dataset.from_dict(
        {"input_ids": [[2, *range(5 + i % 7, 5 + i % 7 + 20), 3] for i in range(64)]})
    stream = Stream("corpus", data, collate, drop_last=True)
    loaders = batches_module.Batches([stream], seed=0, rank=0, world=1, batch_size=4,
                                     accumulation=1, workers=workers, pin_memory=False)
    loaders.start({"corpus": [0, start]})
    return [loaders.next("corpus")[2] for _ in range(count)]


class _WhereCollated(masking.MaskingCollate):
    """MaskingCollate that also says whether it ran in a DataLoader worker."""

    def __call__(self, rows):
        batch = super().__call__(rows)
        batch["in_worker"] = torch.tensor(torch.utils.data.get_worker_info() is not None)
        return batch


def test_masking_runs_in_the_workers_and_a_resumed_stream_masks_the_same() -> None:
    collate = _WhereCollated(
        pad_id=0, pad_to_multiple_of=None, seed=7, rank=0,
        special_ids=torch.tensor([0, 1, 2, 3, 4]), mask_token_id=4, vocab_size=40,
        masked_lm_prob=0.15, max_predictions=5, continuation=None, strategy="token",
        span_p=0.2, span_max_length=10)
    inline = _stream_batches(0, collate, 0, 8)
    workers = _stream_batches(2, collate, 0, 8)
    resumed = _stream_batches(2, collate, 5, 3)  # a run resumed after 5 micro-batches
    assert not any(b.pop("in_worker") for b in inline)
    assert all(b.pop("in_worker") for b in workers + resumed)
    for a, b in zip(inline, workers, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    for a, b in zip(inline[5:], resumed, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert (inline[0]["labels"] != -100).any()  # masked, differently per batch
    assert not torch.equal(inline[0]["labels"] != -100, inline[1]["labels"] != -100)
