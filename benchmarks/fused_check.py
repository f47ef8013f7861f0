"""liger-kernel's fused kernels against the models' own torch code: logits and LoRA gradients, on a GPU.

    python -m benchmarks.fused_check --work /tmp/fused-check        # needs CUDA and `pip install liger-kernel`

For Qwen2.5-14B's and Gemma2-9B's real widths (two layers deep, random weights, nf4 + LoRA r16 on every linear layer,
dropout 0, LoRA B drawn at random so every LoRA weight gets a gradient), one batch of random tokens is run forward
and backward under bf16 autocast twice: as loaded, then with ``kaggle_utils.models.fused.apply_fused_kernels``. It
prints the largest logit difference, the relative difference of the LoRA gradients of the MLP's projections and of
the attention's, and whether every LoRA weight of the MLPs got a gradient with the kernels on (it would not if the
fused MLP bypassed LoRA). bf16 rounding puts both runs ~1e-2 apart; a wrong kernel (a missing Gemma2 norm offset)
puts them O(1) apart.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks.bench_infer import build
from kaggle_utils.models.fused import apply_fused_kernels
from kaggle_utils.models.loading import LoraSettings, ModelConfig, load_classifier


def one_pass(model_dir: Path, ids: torch.Tensor, fused: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits and the LoRA gradients of one forward and backward, kernels on or off."""
    torch.manual_seed(0)  # the same LoRA A in both runs
    model = load_classifier(ModelConfig(model_path=model_dir, device="cuda:0"), 0, lora=LoraSettings(16, 32, 0.0))
    gen = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero: draw it, so A's gradients are not all zero either
            p.data = (torch.randn(p.shape, generator=gen) * 0.02).to(p.device, p.dtype)
    if fused:
        apply_fused_kernels(model, torch.device("cuda:0"))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(input_ids=ids).logits.float()  # (rows, 2)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1] * (len(ids) // 2), device=ids.device)).backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if "lora_" in n}
    del model
    torch.cuda.empty_cache()
    return logits.detach(), grads


def compare(shape: str, work: Path, rows: int = 4, length: int = 512) -> dict:
    model_dir = work / f"{shape}-2layers"
    build(shape, model_dir, "cuda", num_hidden_layers=2)
    ids = torch.randint(100, 30_000, (rows, length), generator=torch.Generator().manual_seed(2)).cuda()
    ref_logits, ref = one_pass(model_dir, ids, fused=False)
    logits, got = one_pass(model_dir, ids, fused=True)

    def rel(part: str) -> float:
        names = [n for n in ref if part in n]
        diff = sum((got[n] - ref[n]).norm() ** 2 for n in names) ** 0.5
        return float(diff / sum(ref[n].norm() ** 2 for n in names) ** 0.5)

    mlp = [n for n in got if "mlp" in n]
    return {
        "shape": shape,
        "max |d logit|": float((logits - ref_logits).abs().max()),
        "logit scale": float(ref_logits.abs().max()),
        "rel d grad mlp": rel("mlp"),
        "rel d grad attn": rel("self_attn"),
        "mlp LoRA with grad": f"{sum(bool(got[n].abs().sum() > 0) for n in mlp)}/{len(mlp)}",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("build/fused-check"))
    args = ap.parse_args()
    rows = [compare(shape, args.work) for shape in ("qwen2.5-14b", "gemma2-9b")]
    print("\n" + " | ".join(rows[0]))
    for r in rows:
        print(" | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in r.values()))


if __name__ == "__main__":
    main()
