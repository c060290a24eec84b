#!/usr/bin/env python3
"""Times the official Q-Align scorer on a CUDA GPU, unchanged, for scripts/gpu-check.sh.

The official `QAlignScorer` (q_align/evaluate/scorer.py) is built around the official
`MPLUGOwl2LlamaForCausalLM` at the dimensions of a config folder (e.g. docs/bench-configs/onealign),
with random weights in fp16 made on the GPU (the 16 GB checkpoint is not needed for timing), and
the tokenizer of another folder (the fixtures' real LLaMA tokenizer). Each timed call is what the
official scorer does per batch: expand2square, CLIPImageProcessor, the model forward, softmax over
the five level logits. Per-image time = call time / batch size. Prints one JSON object.

  python3 scripts/official_gpu_bench.py --src Q_ALIGN_SOURCES --model docs/bench-configs/onealign \
      --tokenizer tests/fixtures/tiny-onealign --images tests/fixtures/images/*.jpg --batch-sizes 1,32

`--device cpu` runs the same on the CPU (still fp16, as the official scorer casts its pixels to
half): a smoke test of this script and of the official code under the GPU machine's package
versions, with a small config such as tests/fixtures/tiny-onealign (its times mean little).

Needs PyTorch (with CUDA for `--device cuda`), and transformers 4.36.1 with the official code's other imports
(scripts/gpu-official-prep.sh gathers their wheels and the sources on a machine with network).
"""
import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", required=True, help="folder holding the official q_align package")
    ap.add_argument("--model", required=True, help="folder with config.json and preprocessor_config.json")
    ap.add_argument("--tokenizer", required=True, help="folder with the LLaMA tokenizer files")
    ap.add_argument("--images", nargs="+", required=True)
    ap.add_argument("--batch-sizes", default="1,32")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = ap.parse_args()

    import torch
    from PIL import Image

    sys.path.insert(0, os.path.abspath(args.src))
    import q_align  # noqa: F401  (registers mplug_owl2 with transformers' Auto classes)
    import transformers
    from q_align.evaluate import scorer as official
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.models.clip.image_processing_clip import CLIPImageProcessor

    # One folder with the config, the preprocessor and the tokenizer, named as the hub id the
    # official model's constructor loads its tokenizer from ("q-future/one-align", relative to the
    # working directory, which is then that folder's grandparent).
    images = [Image.open(p).convert("RGB") for p in args.images]
    args.model, args.tokenizer = os.path.abspath(args.model), os.path.abspath(args.tokenizer)
    work = tempfile.mkdtemp(prefix="official_gpu_")
    model_dir = os.path.join(work, "q-future", "one-align")
    os.makedirs(model_dir)
    for name in ("config.json", "preprocessor_config.json"):
        shutil.copy(os.path.join(args.model, name), model_dir)
    for name in os.listdir(args.tokenizer):
        if name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(os.path.join(args.tokenizer, name), model_dir)
    os.chdir(work)

    out = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
        "device": args.device,
        "model": os.path.basename(os.path.normpath(args.model)) + " (random init, fp16, official code)",
        "dtype": "f16",
    }
    t0 = time.perf_counter()
    torch.manual_seed(0)
    cfg = AutoConfig.from_pretrained(model_dir)
    # Eager attention, as under the official pin (torch 2.0.1). With a newer torch, transformers
    # 4.36 picks SDPA, and the official modeling_llama2.py's SDPA branch names a function it never
    # imports (`_prepare_4d_causal_attention_mask_for_sdpa`: NameError).
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float16, attn_implementation="eager")
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, use_fast=False)
    processor = CLIPImageProcessor.from_pretrained(model_dir)

    def loader(model_path, model_base, model_name, device=args.device, **kw):
        return tokenizer, model, processor, 2048

    official.load_pretrained_model = loader
    scorer = official.QAlignScorer(pretrained=model_dir, device=args.device)
    out["load_s"] = time.perf_counter() - t0
    out["n_params"] = sum(p.numel() for p in model.parameters())

    def sync():
        if args.device == "cuda":
            torch.cuda.synchronize()

    rows = []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        inputs = [images[i % len(images)] for i in range(batch)]
        for _ in range(args.warmup):
            scorer(inputs)
        sync()
        times = []
        for _ in range(args.iters):
            t = time.perf_counter()
            scores = scorer(inputs)
            sync()
            times.append(time.perf_counter() - t)
        median = statistics.median(times)
        rows.append({
            "batch": batch,
            "median_ms": median * 1e3,
            "min_ms": min(times) * 1e3,
            "median_ms_per_item": median * 1e3 / batch,
            "items_per_s": batch / median,
            "score_example": float(scores.float()[0]),
        })
        print(f"# batch {batch}: {median * 1e3 / batch:.2f} ms per image", file=sys.stderr, flush=True)
    out["rows"] = rows
    if args.device == "cuda":
        out["peak_gpu_memory_mib"] = torch.cuda.max_memory_allocated() / 2**20
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
