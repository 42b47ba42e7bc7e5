"""The CUDA paths on a GPU; the whole module is skipped where CUDA is not available.

1. The published outputs (``tests/data/golden``) reproduced on CUDA in fp32 with TF32 off, SDPA on and off.
2. SDPA on CUDA (the fused kernels) against the plain attention math in fp32, and fp16/bf16 autocast
   against fp32, with padding masks; default dispatch picks a fused kernel, not the math fallback.
3. Every fast path (SDPA, gathered heads, dynamic padding, fused AdamW) on CUDA gives the plain fp32
   losses, gradients and weights of the CPU; the retrieval scorer on CUDA gives the model's CPU scores.
4. The published pretraining step and fine-tuning iteration run under
   ``torch.cuda.set_sync_debug_mode("error")``: no host round trip inside a step (``test_sync_free``).
5. The command lines on CUDA: ``train_concap.py`` with ``--bf16`` and with ``--fp16``,
   ``eval_retrieval.py --zero_shot`` on the checkpoint, ``train_tasks.py`` with ``--fp16``.

Helpers and fixtures come from the CPU test modules, so both sides check the same things.
"""

from __future__ import annotations

import copy
import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from tests import conftest
from tests import test_eval_retrieval as eval_tests
from tests import test_fast_paths as fast_paths
from tests import test_golden as golden_tests
from tests import test_modeling as modeling_tests
from tests import test_sync_free as sync_free
from tests.test_fast_paths import FAST, PLAIN, assert_all_close, collate, configured, losses_and_gradients
from vilbert.checkpoint import read_state_dict
from vilbert.config import BertConfig
from vilbert.engine import Optimization
from vilbert.modeling import MASK_VALUE, InterBertForMultiModalPreTraining, InterBertForVLTasks
from vilbert.optimization import build_optimizer, param_groups
from vilbert.precision import Precision
from vilbert.pretraining import pretraining_losses, to_device
from vilbert.retrieval_scorer import RetrievalScorer
from vilbert.training_state import NonFiniteGuard

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DEVICE = torch.device("cuda")
ROOT = Path(conftest.ROOT)
TINY_CONFIG = str(ROOT / "config" / "interbert_tiny.json")
FUSED_ATTENTION = ("flash_attention", "efficient_attention", "cudnn_attention")
# Autocast error as a fraction of an output's largest value: bf16 keeps 8 bits of mantissa, fp16 11;
# on the CPU the tiny model stays within 0.7% (bf16) and 0.15% (fp16) of fp32.
MIXED_TOLERANCE = {"bf16": 0.03, "fp16": 0.005}

golden = golden_tests.golden  # fixtures, shared with the CPU tests
samples = fast_paths.samples


@pytest.fixture(autouse=True)
def exact_fp32():
    """TF32 off for matmuls and cuDNN while a test runs (restored afterwards): fp32 is IEEE fp32."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: value.detach().float().cpu() for name, value in tensors.items() if value is not None}


# 1. The published outputs


@pytest.mark.parametrize("use_sdpa", [True, False], ids=["sdpa", "plain"])
@pytest.mark.parametrize("gather_heads", [True, False], ids=["gathered", "full"])
def test_pretraining_model_reproduces_published_outputs(golden, use_sdpa, gather_heads):
    config, weights, inputs, outputs = golden
    model = golden_tests.pretraining_model(config, weights, use_sdpa, gather_heads).to(DEVICE)
    x = to_device(golden_tests._model_inputs(inputs), DEVICE)
    labels = ("masked_lm_labels", "image_label", "image_target", "next_sentence_label")
    with torch.no_grad():
        losses = model(**x, **to_device({k: inputs[k] for k in labels}, DEVICE))
        scores = model(**x)
        bert = model.bert(**x)
    actual = {
        "pretrain_loss_msm": losses.msm, "pretrain_loss_mrm": losses.mrm, "pretrain_loss_itm": losses.itm,
        "pretrain_scores_text": scores.text, "pretrain_scores_image": scores.image,
        "pretrain_scores_itm": scores.itm, "bert_sequence_text": bert.sequence_output_t,
        "bert_sequence_image": bert.sequence_output_v, "bert_pooled_text": bert.pooled_output_t,
        "bert_pooled_image": bert.pooled_output_v,
    }  # fmt: skip
    assert all(value.device.type == DEVICE.type for value in actual.values())
    for name, value in _cpu(actual).items():
        golden_tests._close(value, outputs[name], name)  # within test_golden's 1e-5


@pytest.mark.parametrize("use_sdpa", [True, False], ids=["sdpa", "plain"])
def test_task_model_reproduces_published_outputs(golden, use_sdpa):
    config, weights, inputs, outputs = golden
    model = golden_tests.task_model(config, weights, use_sdpa).to(DEVICE)
    x = to_device(golden_tests._model_inputs(inputs), DEVICE)
    with torch.no_grad():
        full, pooled = model(**x), model(**x, pooled_only=True)
    for name, value in _cpu(vars(full)).items():
        golden_tests._close(value, outputs[f"vl_{name}"], name)
    for name, value in _cpu(vars(pooled)).items():
        golden_tests._close(value, outputs[f"vl_{name}"], f"pooled_only {name}")


# 2. SDPA kernels and mixed precision


def _vl_model_and_batch() -> tuple[InterBertForVLTasks, dict[str, torch.Tensor]]:
    """The tiny project config (head size 16, as the fused kernels want), captions and region lists padded."""
    config = BertConfig.from_json_file(TINY_CONFIG)
    torch.manual_seed(0)
    model = InterBertForVLTasks(config).eval().to(DEVICE)
    batch = modeling_tests.random_batch(config, batch=8, text=30, regions=13, seed=1)
    assert (batch["attention_mask"] == 0).any() and (batch["image_attention_mask"] == 0).any()
    return model, to_device(batch, DEVICE)


def _outputs(model: InterBertForVLTasks, batch: dict, use_sdpa: bool, mode: str = "fp32") -> dict:
    model.set_attention_impl(use_sdpa)
    with torch.no_grad(), Precision(mode, DEVICE).autocast():
        return _cpu(vars(model(**batch)))


def _assert_outputs_close(actual: dict, expected: dict, **tolerance: float) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        message = lambda m, n=name: f"{n}: {m}"  # noqa: E731
        torch.testing.assert_close(actual[name], expected[name], **tolerance, msg=message)


@pytest.mark.parametrize("backend", [None, SDPBackend.EFFICIENT_ATTENTION], ids=["default", "efficient"])
def test_sdpa_kernels_give_the_plain_attention_in_fp32(backend):
    model, batch = _vl_model_and_batch()
    expected = _outputs(model, batch, use_sdpa=False)
    if backend is None:
        actual = _outputs(model, batch, use_sdpa=True)
    else:
        with sdpa_kernel([backend]):
            actual = _outputs(model, batch, use_sdpa=True)
    _assert_outputs_close(actual, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["bf16", "fp16"])
@pytest.mark.parametrize("use_sdpa", [True, False], ids=["sdpa", "plain"])
def test_autocast_stays_close_to_fp32(mode, use_sdpa):
    model, batch = _vl_model_and_batch()
    expected = _outputs(model, batch, use_sdpa=False)
    actual = _outputs(model, batch, use_sdpa, mode)
    assert actual.keys() == expected.keys() and all(torch.isfinite(v).all() for v in actual.values())
    for name, value in expected.items():
        masked = value < MASK_VALUE / 2  # padded regions' logits: -10000 plus a little
        assert torch.equal(actual[name] < MASK_VALUE / 2, masked), name
        scale, error = float(value[~masked].abs().max()), float((actual[name] - value)[~masked].abs().max())
        assert error <= MIXED_TOLERANCE[mode] * scale, f"{name}: max abs error {error:.3g} of {scale:.3g}"


@pytest.mark.parametrize("mode", ["fp32", "bf16", "fp16"])
def test_sdpa_dispatches_to_a_fused_kernel(mode):
    """With the padding masks the model passes, the default dispatch must not fall back to the math."""
    model, batch = _vl_model_and_batch()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        _outputs(model, batch, use_sdpa=True, mode=mode)
    ops = {event.name for event in prof.events() if "attention" in event.name}
    assert any(kernel in op for op in ops for kernel in FUSED_ATTENTION), sorted(ops)
    assert not any(op.endswith("_math") for op in ops), sorted(ops)


# 3. The fast paths on CUDA against the plain path on the CPU


@pytest.mark.parametrize("path", [PLAIN, FAST], ids=["plain", "all-fast-paths"])
def test_cuda_gives_the_cpu_losses_and_gradients(samples, path):
    torch.manual_seed(0)
    reference = configured(InterBertForMultiModalPreTraining(fast_paths.tiny_config()).eval(), PLAIN)
    candidate = configured(copy.deepcopy(reference), path).to(DEVICE)
    for batch_samples in samples:
        expected = losses_and_gradients(reference, collate(batch_samples, PLAIN))
        losses, grads = losses_and_gradients(candidate, to_device(collate(batch_samples, path), DEVICE))
        assert next(iter(grads.values())).device.type == DEVICE.type
        assert_all_close(_cpu(losses), expected[0])  # test_fast_paths' 1e-5
        assert_all_close(_cpu(grads), expected[1])


def test_fused_adamw_steps_on_cuda_give_the_cpu_weights(samples):
    """Two optimiser steps: every fast path and fused AdamW on CUDA, plain for-loop AdamW on the CPU.
    Eval mode on both sides: the ITM head's fixed dropout draws different masks on CUDA and CPU."""
    torch.manual_seed(0)
    plain = configured(InterBertForMultiModalPreTraining(fast_paths.tiny_config()).eval(), PLAIN)
    fast = configured(copy.deepcopy(plain), FAST).to(DEVICE)
    optimizer = build_optimizer("AdamW", param_groups(fast), lr=1e-3)
    assert optimizer.param_groups[0]["fused"], "AdamW on CUDA parameters should be the fused kernel"
    fast_step = Optimization(
        fast, optimizer, None, Precision("fp32", DEVICE).make_scaler(), NonFiniteGuard(3), max_grad_norm=1.0
    )
    steps = ((plain, fast_paths._optimization(plain), PLAIN), (fast, fast_step, FAST))
    for batch_samples in samples:
        for model, step, path in steps:
            batch = to_device(collate(batch_samples, path), next(model.parameters()).device)
            loss, _ = pretraining_losses(model, batch, fast_paths.LOSS_ARGS)
            step.backward(loss)
            assert not step.step()  # 0.0: not skipped
    assert_all_close(_cpu(dict(fast.named_parameters())), dict(plain.named_parameters()))


def test_prefetched_batches_arrive_whole_and_in_order_while_the_device_computes():
    """The next batch is copied on a side stream while a long matrix product runs on the compute
    stream; each batch taken must hold exactly its host values."""
    from vilbert.device_prefetch import prefetch_to_device

    host = [{"x": (torch.arange(1 << 20) + i).pin_memory()} for i in range(6)]
    work = torch.randn(4096, 4096, device=DEVICE)
    for index, (taken, moved) in enumerate(prefetch_to_device(iter(host), DEVICE)):
        assert taken is host[index]
        work = work @ work / 64  # keeps the compute stream busy while the next copy runs
        assert torch.equal(moved["x"].cpu(), host[index]["x"])


class _SyncsAreErrors:
    """CUDA's own check: any synchronising call in the block raises."""

    def __enter__(self) -> None:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")

    def __exit__(self, *exc: object) -> None:
        torch.cuda.set_sync_debug_mode("default")


def test_the_published_steps_on_cuda_never_wait_for_the_host(samples):
    """The steps of ``test_sync_free`` on the GPU, with every synchronising CUDA call an error; the
    host then learns from the guard (outside the steps) that nothing was skipped."""
    for step in (
        sync_free.pretraining_steps(samples, DEVICE, _SyncsAreErrors()),
        sync_free.finetuning_steps(DEVICE, _SyncsAreErrors()),
    ):
        step.settle()
        assert step.guard.skipped_steps == 0
        assert all(torch.isfinite(p).all() for p in step.model.parameters())


@pytest.mark.parametrize("model_class", [InterBertForVLTasks, InterBertForMultiModalPreTraining])
@pytest.mark.parametrize("mode, tolerance", [("fp32", 1e-5), ("fp16", 1e-2), ("bf16", 5e-2)])
def test_retrieval_scorer_on_cuda_gives_the_model_scores(model_class, mode, tolerance):
    """Scores with a spread of 0.1; on the CPU, fp16 autocast moves them by up to 0.003, bf16 by 0.015."""
    values = json.loads(Path(TINY_CONFIG).read_text())
    config = BertConfig(**{**values, "initializer_range": 0.2})  # scores spread over (0, 1)
    torch.manual_seed(0)
    model = model_class(config).eval()
    text, image = eval_tests._random_inputs(config, captions=6, images=9)
    expected = eval_tests._forward_scores(model, text, image)  # on the CPU, fp32
    scorer = RetrievalScorer(model.to(DEVICE), Precision(mode, DEVICE), pairs_per_forward=16)
    scores = scorer.score(scorer.stream(text, scorer.embed_images([image], 9)))
    assert scores.shape == (6, 9) and np.isfinite(scores).all()
    error = float(np.abs(scores - expected).max())
    assert error < tolerance, f"{mode}: max abs error {error:.3g}"


# 4. The command lines on CUDA


def _cli_helpers():
    """test_pretraining, imported only when the command lines run: it imports tensorboardX's protobuf
    modules, and a failure there must not keep the tests above from running."""
    from tests import test_pretraining

    return test_pretraining


def _finite(values) -> bool:
    return bool(np.isfinite(np.asarray(values, dtype=np.float64)).all())


def _history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]


def _assert_trained_on_cuda(state_file: Path, fp16: bool) -> None:
    """Optimiser moments on the GPU, fused AdamW, and the GradScaler on for fp16 only."""
    state = torch.load(state_file, weights_only=True)  # tensors come back where they were saved
    moments = next(iter(state["optimizer"]["state"].values()))
    assert moments["exp_avg"].device.type == DEVICE.type
    assert state["optimizer"]["param_groups"][0]["fused"]
    assert ("scale" in state["scaler"]) == fp16


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A --small synthetic world written by the tool, with fewer pretraining and Flickr30K training images."""
    root = tmp_path_factory.mktemp("cuda") / "world"
    make_synthetic_data = runpy.run_path(str(ROOT / "tools" / "make_synthetic_data.py"))["main"]
    arguments = ["--output_dir", str(root), "--small", "--num_images", "64", "--flickr_train_images", "16"]
    assert make_synthetic_data(arguments) == 0
    return root


@pytest.fixture(scope="module")
def pretraining_runs(world):
    """``train_concap.py`` on CUDA, one epoch of batch 16, with --bf16 and with --fp16 (together)."""
    out = world.parent / "pretraining"
    data = str(world / "conceptual_captions")
    common = [
        sys.executable, str(ROOT / "train_concap.py"), "--train_data_dir", data, "--val_data_dir", data,
        "--config_file", TINY_CONFIG, "--train_batch_size", "16", "--num_train_epochs", "1", "--span_mask",
        "--num_workers", "2", "--log_every", "1", "--quiet", "--output_dir", str(out),
    ]  # fmt: skip
    commands = {mode: [*common, "--save_name", mode, f"--{mode}"] for mode in ("bf16", "fp16")}
    return out, _cli_helpers()._run_together(commands, world.parent)


@pytest.fixture(scope="module")
def downstream_runs(world, pretraining_runs):
    """On the pretrained checkpoints: zero-shot retrieval (fp32 and bf16), one --fp16 fine-tuning epoch."""
    out, results = pretraining_runs
    for result in results.values():
        _cli_helpers()._check_ok(result)
    evaluation = [
        sys.executable, str(ROOT / "eval_retrieval.py"),
        "--from_pretrained", str(out / "bf16" / "pytorch_model_0.bin"),
        "--config_file", TINY_CONFIG, "--task", "3", "--split", "test", "--zero_shot", "--num_workers", "2",
        "--quiet", "--output_dir", str(world.parent / "eval"),
    ]  # fmt: skip
    commands = {
        "eval_fp32": [*evaluation, "--save_name", "fp32"],
        "eval_bf16": [*evaluation, "--save_name", "bf16", "--bf16"],
        "finetune_fp16": [
            sys.executable, str(ROOT / "train_tasks.py"),
            "--from_pretrained", str(out / "fp16" / "pytorch_model_0.bin"),
            "--config_file", TINY_CONFIG, "--task_config", str(world / "interbert_tasks.yml"), "--tasks", "3",
            "--num_train_epochs", "1", "--fp16", "--num_workers", "2", "--log_every", "1", "--quiet",
            "--save_every_steps", "0", "--output_dir", str(world.parent / "finetuning"),
            "--save_name", "fp16",
        ],
    }  # fmt: skip
    # From the data folder, where eval_retrieval.py finds its default task YAML.
    return _cli_helpers()._run_together(commands, world)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["bf16", "fp16"])
def test_pretraining_cli_on_cuda(pretraining_runs, mode):
    helpers, (out, results) = _cli_helpers(), pretraining_runs
    helpers._check_ok(results[mode])
    run = out / mode
    assert {p.name for p in run.iterdir()} == helpers.RUN_FILES
    weights = read_state_dict(str(run / "pytorch_model_0.bin"))
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in weights.values())
    _assert_trained_on_cuda(run / "training_state.pt", fp16=mode == "fp16")
    records = _history(run)
    assert {r["split"] for r in records} == {"train", "val"}
    assert all(_finite([v for k, v in r.items() if k != "split"]) for r in records), records
    assert _finite([value for _, value in helpers._read_scalars(run / "logs")["val/loss"]])


@pytest.mark.slow
def test_zero_shot_retrieval_cli_on_cuda(world, downstream_runs):
    reports, scores = {}, {}
    for mode in ("fp32", "bf16"):
        result = downstream_runs[f"eval_{mode}"]
        _cli_helpers()._check_ok(result)
        assert "(zero-shot)" in result.stderr  # _run_together: stdout and stderr together
        folder = world.parent / "eval" / mode
        scores[mode] = np.load(folder / "scores_test.npy")
        reports[mode] = json.loads((folder / "retrieval_test.json").read_text())
        assert scores[mode].shape == (150, 30) and np.all((scores[mode] >= 0) & (scores[mode] <= 1))
        assert reports[mode]["mode"] == "zero-shot"
        for direction in ("image_retrieval", "text_retrieval"):
            assert _finite(list(reports[mode][direction].values())), reports[mode]
    error = float(np.abs(scores["bf16"] - scores["fp32"]).max())
    assert error < 2e-2, f"bf16 scores differ from fp32 by up to {error:.3g}"


@pytest.mark.slow
def test_fine_tuning_cli_with_fp16_on_cuda(world, downstream_runs):
    _cli_helpers()._check_ok(downstream_runs["finetune_fp16"])
    run = world.parent / "finetuning" / "RetrievalFlickr30k_interbert_tiny-fp16"
    assert (run / "pytorch_model_0.bin").is_file() and (run / "command.txt").is_file()
    weights = read_state_dict(str(run / "pytorch_model_0.bin"))
    assert all(torch.isfinite(v).all() for v in weights.values())
    _assert_trained_on_cuda(run / "training_state.pt", fp16=True)
    metrics = json.loads((run / "metrics.json").read_text())
    [validation] = metrics["validation"]
    assert _finite([validation["RetrievalFlickr30k/loss"], validation["RetrievalFlickr30k/score"]]), metrics
    train = [r for r in _history(run) if r["split"] == "train"]
    assert train and all(_finite([v for k, v in r.items() if k != "split"]) for r in train), train
