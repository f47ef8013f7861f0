"""Max |Δ logit| of a merged model against the unmerged nf4 + adapter it came from, on the CPU with tiny models.

The LoRA merged into the dequantised nf4 weights (``merge_dequantized``) against the merge into the original
weights (``merge_naive``, the seed's degradation), for a trained tiny Qwen2 adapter (the test suite's recipe) and a
tiny Gemma2 adapter with random LoRA B and head, saved as fp32 / fp16 / bf16, plus the int8 copy of the fp16 one.

``python benchmarks/merge_check.py`` (about 3 minutes on 2 CPU cores); prints a table on stderr.
"""

from __future__ import annotations

import contextlib
import io
import sys
import tempfile
from pathlib import Path

import torch

from kaggle_utils.data.demo import DemoDataConfig, generate_demo_data
from kaggle_utils.models.demo import DemoModelsConfig, build_demo_models
from kaggle_utils.models.loading import LoraSettings, ModelConfig, load_classifier, load_tokenizer
from kaggle_utils.models.merge import MergeConfig, merge_dequantized, merge_naive
from kaggle_utils.prepare import PrepareConfig, prepare
from kaggle_utils.train import TrainConfig, train


def adapters(root: Path, models: dict[str, Path]) -> dict[str, Path]:
    """A trained tiny Qwen2 adapter and a tiny Gemma2 adapter with seeded random LoRA B and head."""
    files = generate_demo_data(
        DemoDataConfig(out_dir=root / "data", n_train=600, n_test=120, n_unlabeled=120, length_scale=0.05)
    )
    prepare(PrepareConfig(data_dir=files["train"].parent, out_dir=root / "prepared", n_folds=5))
    cfg = TrainConfig.flat(
        model_path=models["qwen2-tiny"], train_file=root / "prepared/train.parquet", out_dir=root / "trained",
        max_length=256, lr=2e-3, epochs=3, batch_tokens=4096, max_rows=16, save_every=30,
    )  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        qwen = train(cfg).adapter_dir
    tok = load_tokenizer(models["qwen2-tiny"])
    gemma = load_classifier(
        ModelConfig(model_path=models["gemma2-tiny"], device="cpu"), tok.pad_token_id, lora=LoraSettings(8, 16)
    )
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in gemma.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    gemma.save_pretrained(root / "gemma-adapter")
    tok.save_pretrained(root / "gemma-adapter")
    return {"qwen2": qwen, "gemma2": root / "gemma-adapter", "test": files["test"]}


def main() -> None:
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp())
    models = build_demo_models(DemoModelsConfig(out_dir=root / "models"))
    made = adapters(root, models)
    print(
        f"{'model':7} {'dtype':5} {'merge':18} {'max|Δlogit|':>12} {'adapter effect':>15} {'int8':>10}", file=sys.stderr
    )
    for arch in ("qwen2", "gemma2"):
        for dtype in ("fp32", "fp16", "bf16"):
            for merge in (merge_dequantized, merge_naive):
                cfg = MergeConfig(
                    base_model=models[f"{arch}-tiny"], adapter=made[arch], dtype=dtype, device="cpu",
                    out_dir=root / f"{arch}-{dtype}-{merge.__name__}",
                    check_file=made["test"], check_rows=120, export_int8=dtype == "fp16",
                )  # fmt: skip
                info = merge(cfg).info
                int8 = (info.get("int8") or {}).get("max_abs_logit_delta")
                check = info["check"]
                print(
                    f"{arch:7} {dtype:5} {merge.__name__:18} {check['max_abs_logit_delta']:12.3e} "
                    f"{check['max_abs_logit_change_by_adapter']:15.3f} {'' if int8 is None else f'{int8:10.3e}'}",
                    file=sys.stderr,
                )


if __name__ == "__main__":
    main()
