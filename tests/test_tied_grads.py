"""Full mode with tied embeddings: the lookup's gradient as rows and the head's written in place give torch's gradients."""

import pytest
import torch
from tiny_runs import run_settings

from peftgen import config as config_lib
from peftgen import efficiency, training
from peftgen import model as model_lib
from peftgen.fused_loss import FusedHeadLoss

IDS = torch.tensor([[50257, 464, 1468, 50258, 50259], [50257, 318, 257, 1332, 50258]])
LABELS = IDS.masked_fill(IDS == 50259, -100)


def _full(base, rows: bool):
    settings = {"model": str(base), "mode": "full", "train_file": "x", "embedding_row_grads": rows}
    torch.manual_seed(0)
    model = model_lib.prepare_for_training(config_lib.resolve(None, settings))[0]
    model.loss_type = "ForCausalLM"  # as training sets it: the mean over shifted labels
    return model.eval()  # no dropout: the two models compute the same thing


def _backward(model, fused: bool, passes: int = 1) -> dict[str, torch.Tensor]:
    loss = FusedHeadLoss(model) if fused else None
    for _ in range(passes):  # more than one: gradient accumulation adds into .grad
        if fused:
            with loss.bypass():
                outputs = model(input_ids=IDS)
            loss(outputs, LABELS).backward()
        else:
            model(input_ids=IDS, labels=LABELS).loss.backward()
    return {name: param.grad for name, param in model.named_parameters() if param.grad is not None}


@pytest.mark.parametrize("fused", [True, False], ids=["fused loss", "transformers' loss"])
@pytest.mark.parametrize("passes", [1, 2])
def test_gradients_equal_those_of_the_dense_lookup(tiny_gpt2, fused, passes):
    rows, dense = _full(tiny_gpt2, True), _full(tiny_gpt2, False)
    assert efficiency.gives_row_grads(rows.get_input_embeddings())
    assert not efficiency.gives_row_grads(dense.get_input_embeddings())
    got, expected = _backward(rows, fused, passes), _backward(dense, fused, passes)
    assert got.keys() == expected.keys() and "transformer.wte.weight" in got
    for name, grad in got.items():
        assert grad.layout == torch.strided, name  # what every optimizer takes: no sparse gradient is left
        assert torch.allclose(grad, expected[name], atol=1e-6), name
    tied = got["transformer.wte.weight"]
    assert tied[IDS.unique()].abs().sum() > 0  # rows the lookup reached (and the head's gradient) are in it


def test_the_fused_loss_writes_the_tied_head_gradient_in_place_only_with_row_grads(tiny_gpt2):
    assert FusedHeadLoss(_full(tiny_gpt2, True)).head.into_grad
    assert not FusedHeadLoss(_full(tiny_gpt2, False)).head.into_grad


def test_untied_or_frozen_embeddings_keep_the_dense_lookup(tiny_gpt2, tiny_llama):
    # Alone on its weight, a sparse gradient would reach the optimizer.
    untied = model_lib.prepare_for_training(config_lib.resolve(None, {"model": str(tiny_llama), "mode": "full", "train_file": "x"}))[0]
    assert not efficiency.gives_row_grads(untied.get_input_embeddings())
    frozen = _full(tiny_gpt2, False)
    frozen.get_input_embeddings().weight.requires_grad_(False)
    assert not efficiency.embedding_row_grads(frozen)
    lora = model_lib.prepare_for_training(config_lib.resolve(None, {"model": str(tiny_gpt2), "mode": "lora", "train_file": "x"}))[0]
    assert not any(efficiency.gives_row_grads(m) for m in lora.modules() if isinstance(m, torch.nn.Embedding))


@pytest.mark.parametrize(
    "extra",
    [{}, {"gradient_checkpointing": True, "grad_accum": 2}, {"fused_loss": False}],
    ids=["defaults", "checkpointing and accumulation", "transformers' loss"],
)
def test_a_full_run_with_row_gradients_learns_what_the_dense_lookup_learns(tiny_gpt2, text_files, tmp_path, extra):
    # Through Trainer: fused AdamW (which refuses sparse gradients), clipping, accumulation; same seed, same dropout masks.
    losses = []
    for rows in (True, False):
        settings = run_settings(tiny_gpt2, text_files, tmp_path / str(rows), mode="full", lr=1e-3, embedding_row_grads=rows, **extra)
        losses.append(training.train(config_lib.resolve(None, settings), progress=False).metrics["eval_loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
