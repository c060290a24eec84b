#!/usr/bin/env python3
"""Checks that the model folders qalign writes (`qalign merge`, `qalign train --full` and its
checkpoint-N folders) load in the official Q-Align code and score the same; prints JSON. The
reference numbers pasted into crates/qalign-cli/tests/interop_official.rs come from this script.

  score  --src Q_ALIGN_SRC [--model-name NAME] MODEL_DIR IMAGE...
      The official scorer's path (q_align/evaluate/scorer.py: `load_pretrained_model(folder, None,
      "mplug_owl2")`, i.e. AutoTokenizer + AutoModelForCausalLM.from_pretrained + CLIPImageProcessor
      from the folder; with a NAME holding "q-align", as the eval scripts pass a folder's name,
      MPLUGOwl2LlamaForCausalLM.from_pretrained), unchanged except float32 on the CPU and eager
      attention (the official code casts to float16 for CUDA). Reports the loader's missing,
      unexpected and mismatched keys, the safetensors metadata and dtypes of the folder, and per
      image and task (quality, aesthetics) the level logits, probabilities, score01 and score15
      (= probs . [5, 4, 3, 2, 1]). Needs PyTorch, transformers 4.36.1 and the official code's other
      imports (tokenizers 0.15, huggingface_hub 0.19, accelerate 0.21, sentencepiece, einops,
      icecream; scripts/gpu-official-prep.sh gathers them and the sources, which Q_ALIGN_SRC names:
      the folder holding the `q_align` package).

  peft-merge BASE_DIR ADAPTER_DIR MERGED_DIR
      Merges the adapter with PEFT's own `merge_and_unload()` (no official code, PEFT 0.22 here:
      the targets are rebuilt as plain torch.nn.Linear modules in float32, with the adapter's
      `non_lora_trainables.bin` applied as the official builder does) and compares every tensor of
      MERGED_DIR with it: the largest absolute difference per tensor, and where the merged folder
      stores a 16-bit dtype, whether the value equals PEFT's rounded to that dtype.

Runs on the CPU in float32. The official stack is only needed for `score`; `peft-merge` needs
torch, safetensors and PEFT. Examples:

  qalign merge --model tests/fixtures/tiny-onealign --lora tests/fixtures/lora/q-align-tiny-lora --out /tmp/merged
  PYTHONPATH=/path/to/transformers-4.36.1-libs python3 scripts/interop_official.py score \
      --src target/gpu-official/src /tmp/merged tests/fixtures/images/*
  python3 scripts/interop_official.py peft-merge tests/fixtures/tiny-onealign \
      tests/fixtures/lora/q-align-tiny-lora /tmp/merged
"""
import argparse
import contextlib
import json
import os
import shutil
import struct
import sys
import tempfile

HUB_ID = "q-future/one-align"


def safetensors_header(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def folder_report(model_dir):
    """What the folder holds: weight files, their metadata and dtypes, the index if any."""
    names = sorted(os.listdir(model_dir))
    rep = {"files": names, "weights": {}}
    for name in names:
        if name.endswith(".safetensors"):
            h = safetensors_header(os.path.join(model_dir, name))
            meta = h.pop("__metadata__", None)
            dtypes = {}
            for v in h.values():
                dtypes[v["dtype"]] = dtypes.get(v["dtype"], 0) + 1
            rep["weights"][name] = {"metadata": meta, "tensors": len(h), "dtypes": dtypes}
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if index in names:
            with open(os.path.join(model_dir, index)) as f:
                idx = json.load(f)
            rep["index"] = {"file": index, "shards": sorted(set(idx["weight_map"].values()))}
    return rep


@contextlib.contextmanager
def hub_alias(model_dir):
    """The official model constructor loads its tokenizer from "q-future/one-align": run in a
    folder where that name is a link to the model folder (nothing is downloaded)."""
    tmp = tempfile.mkdtemp(prefix="interop_cwd_")
    os.makedirs(os.path.join(tmp, "q-future"))
    os.symlink(os.path.abspath(model_dir), os.path.join(tmp, HUB_ID))
    old = os.getcwd()
    os.chdir(tmp)
    try:
        yield
    finally:
        os.chdir(old)
        shutil.rmtree(tmp, ignore_errors=True)


def cmd_score(args):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    sys.path.insert(0, os.path.abspath(args.src))
    import transformers
    from PIL import Image
    from q_align.evaluate import scorer as sc
    from q_align.model import builder

    model_dir = os.path.abspath(args.model)
    report = {"transformers": transformers.__version__, "torch": torch.__version__}
    report["folder"] = folder_report(model_dir)
    loading = {}

    def f32(load):
        """A from_pretrained of the builder, in float32 and recording the loading info."""

        def from_pretrained(path, **kw):
            kw["torch_dtype"] = torch.float32
            # Eager attention, as under the official pin (torch 2.0.1): with a newer torch,
            # transformers 4.36 picks SDPA, whose branch in the official modeling_llama2.py
            # names a function it never imports (NameError).
            kw["attn_implementation"] = "eager"
            model, info = load(path, output_loading_info=True, **kw)
            loading.update({k: sorted(map(str, v)) for k, v in info.items()})
            return model

        return staticmethod(from_pretrained)

    # The builder loads through AutoModelForCausalLM for the scorer's model name ("mplug_owl2"),
    # through MPLUGOwl2LlamaForCausalLM for a name with "q-align" in it (the eval scripts pass
    # the folder's name); both are shimmed, in the builder's namespace only.
    official = {n: getattr(builder, n) for n in ("AutoModelForCausalLM", "MPLUGOwl2LlamaForCausalLM")}
    for name, cls in official.items():
        setattr(builder, name, type(name, (), {"from_pretrained": f32(cls.from_pretrained)}))
    half = torch.Tensor.half
    torch.Tensor.half = lambda self, *a, **k: self  # the scorers' .half(): stay in float32
    cached = sc.load_pretrained_model
    try:
        with hub_alias(model_dir):
            loaded = builder.load_pretrained_model(model_dir, None, args.model_name, device="cpu")
            model = loaded[1]
            sc.load_pretrained_model = lambda *a, **k: loaded
            scorers = {"quality": sc.QAlignScorer(pretrained=model_dir, device="cpu"),
                       "aesthetics": sc.QAlignAestheticScorer(pretrained=model_dir, device="cpu")}
        report["model_class"] = type(model).__name__
        report["loading_info"] = loading
        report["param_dtypes"] = sorted({str(p.dtype) for p in model.state_dict().values()})
        captured = {}
        model.lm_head.register_forward_hook(lambda m, i, o: captured.__setitem__("logits", o))
        w15 = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
        scores = {}
        for path in args.images:
            img = Image.open(path)
            img.load()
            if img.mode not in ("RGB", "RGBA"):  # the official expand2square needs a colour mode
                img = img.convert("RGB")
            ent = {}
            for task, s in scorers.items():
                s.weight_tensor = s.weight_tensor.float()
                score01 = s([img])
                lvl = captured["logits"][0, -1, s.preferential_ids_].float()
                probs = torch.softmax(lvl, -1)
                ent[task] = {
                    "level_logits": [float(x) for x in lvl],
                    "probs": [float(x) for x in probs],
                    "score01": float(score01[0]),
                    "score15": float(probs @ w15),
                }
            scores[os.path.basename(path)] = ent
        report["scores"] = scores
    finally:
        torch.Tensor.half = half
        sc.load_pretrained_model = cached
        for name, cls in official.items():
            setattr(builder, name, cls)
    print(json.dumps(report, indent=1))


def load_weights(model_dir):
    from safetensors.torch import load_file

    out = {}
    for name in sorted(os.listdir(model_dir)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(model_dir, name)))
    return out


def cmd_peft_merge(args):
    import torch
    from peft import PeftModel

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    base = {k: v.float() for k, v in load_weights(args.base).items()}
    with open(os.path.join(args.adapter, "adapter_config.json")) as f:
        targets = json.load(f)["target_modules"]

    class Root(torch.nn.Module):
        """What PEFT's causal-LM wrapper asks of the model it wraps (never called here)."""

        def prepare_inputs_for_generation(self, *a, **k):
            raise NotImplementedError

    # A module tree holding the base's tensors, with nn.Linear at each LoRA target.
    root = Root()
    for key, t in base.items():
        *path, leaf = key.split(".")
        mod = root
        for part in path:
            if not hasattr(mod, part):
                mod.add_module(part, torch.nn.Module())
            mod = getattr(mod, part)
        if ".".join(path) in targets and leaf == "weight":
            continue
        mod.register_parameter(leaf, torch.nn.Parameter(t.clone(), requires_grad=False))
    for target in targets:
        *path, leaf = target.split(".")
        mod = root
        for part in path:
            mod = getattr(mod, part)
        old = getattr(mod, leaf)
        w = base[target + ".weight"]
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=hasattr(old, "bias"))
        with torch.no_grad():
            lin.weight.copy_(w)
            if hasattr(old, "bias"):
                lin.bias.copy_(old.bias)
        setattr(mod, leaf, lin)
    # The official builder: non_lora_trainables (keys without "base_model." and one "model.")
    # replace the base's tensors before PEFT loads the adapter.
    nl_path = os.path.join(args.adapter, "non_lora_trainables.bin")
    if os.path.exists(nl_path):
        nl = torch.load(nl_path, map_location="cpu")
        nl = {(k[11:] if k.startswith("base_model.") else k): v for k, v in nl.items()}
        if any(k.startswith("model.model.") for k in nl):
            nl = {(k[6:] if k.startswith("model.") else k): v for k, v in nl.items()}
        missing, unexpected = root.load_state_dict({k: v.float() for k, v in nl.items()}, strict=False)
        assert not unexpected, unexpected
    root.config = {"model_type": "mplug_owl2"}
    peft_model = PeftModel.from_pretrained(root, args.adapter)
    merged = peft_model.merge_and_unload()
    reference = {k: v.detach() for k, v in merged.state_dict().items()}

    ours = load_weights(args.merged)
    report = {"peft": __import__("peft").__version__, "keys_only_in_peft": sorted(set(reference) - set(ours)),
              "keys_only_in_merged": sorted(set(ours) - set(reference)), "tensors": {}}
    worst = 0.0
    for key in sorted(set(reference) & set(ours)):
        ref, got = reference[key], ours[key]
        diff = float((got.float() - ref).abs().max()) if ref.numel() else 0.0
        entry = {"dtype": str(got.dtype).replace("torch.", ""), "max_abs_diff": diff,
                 "max_abs": float(ref.abs().max()) if ref.numel() else 0.0}
        if got.dtype != torch.float32:
            entry["equals_rounded"] = bool(torch.equal(ref.to(got.dtype), got))
        if key.removesuffix(".weight") in targets:
            # PEFT's merged weight, summarised for tests that cannot run PEFT (float64 sums).
            r64 = ref.double()
            entry.update(lora_target=True, peft_sum=float(r64.sum()), peft_sum_sq=float((r64 * r64).sum()),
                         peft_row0=[float(x) for x in ref[0, :8]])
        report["tensors"][key] = entry
        worst = max(worst, diff)
    report["max_abs_diff"] = worst
    report["lora_targets_max_abs_diff"] = max(
        (e["max_abs_diff"] for e in report["tensors"].values() if e.get("lora_target")), default=0.0)
    print(json.dumps(report, indent=1))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("score")
    s.add_argument("--src", required=True, help="folder holding the official q_align package")
    s.add_argument("--model-name", default="mplug_owl2",
                   help="the name the builder gets: the scorer's (default), or e.g. q-align-merged, "
                   "as the eval scripts derive it from a folder name")
    s.add_argument("model")
    s.add_argument("images", nargs="+")
    p = sub.add_parser("peft-merge")
    p.add_argument("base")
    p.add_argument("adapter")
    p.add_argument("merged")
    args = ap.parse_args()
    {"score": cmd_score, "peft-merge": cmd_peft_merge}[args.cmd](args)


if __name__ == "__main__":
    main()
