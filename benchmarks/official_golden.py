"""Run the official HeadKV head-detection scripts themselves and keep what they output, per probe, as numbers and ids:
the golden file `tests/test_official_golden.py` checks `headprof score --preset` against.

Runs in the scripts' own environment (transformers 4.37.2), not headprof's; `benchmarks/official_golden.sh` makes it
and runs every case. The scripts are imported from a checkout of FYYFU/HeadKV and run unmodified; around them:

- flash-attn (CUDA only) is replaced by a module whose `flash_attn_func` is PyTorch's SDPA with the same semantics
  (causal, bottom-right aligned, GQA), used for the prefill only; the scored decode steps run the modelling file's
  own `forward_torch`;
- `--dtype float32` loads the model in fp32 where the scripts ask for bf16 (the bf16 cases keep the scripts' dtype);
- the tester is built with the grid given here (`--lengths`, `--depths`) instead of `--s/--e` (which repeats cells);
- each probe's decoded ids, its per-head sums and its verdict score are recorded as the script computes them.

    python benchmarks/official_golden.py --headkv ~/HeadKV --model DIR --script r2 --haystack FOLDER \\
        --lengths 400,800 --depths 0,50,100 --dtype float32 --out golden.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
import types
from pathlib import Path


def fake_flash_attn() -> None:
    """A `flash_attn` module whose one function the modelling file calls (unpadded prefill) is SDPA."""
    import torch.nn.functional as F

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **_):
        # (batch, seq, heads, dim) in and out, as flash-attn; KV heads shared by groups of query heads
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        if causal and q.shape[2] != k.shape[2]:
            raise ValueError("the prefill is square; a causal call of other shapes is not expected here")
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal, scale=softmax_scale)
        return out.transpose(1, 2)

    def unsupported(*args, **kwargs):
        raise RuntimeError("padded flash-attn calls are not expected in a batch-1 run")

    flash = types.ModuleType("flash_attn")
    flash.flash_attn_func, flash.flash_attn_varlen_func = flash_attn_func, unsupported
    flash.__version__ = "2.5.0"
    padding = types.ModuleType("flash_attn.bert_padding")
    padding.index_first_axis = padding.pad_input = padding.unpad_input = unsupported
    sys.modules["flash_attn"], sys.modules["flash_attn.bert_padding"] = flash, padding
    import transformers.utils
    import transformers.utils.import_utils as iu

    for mod in (transformers.utils, iu):
        mod.is_flash_attn_2_available = lambda: True
        mod.is_flash_attn_greater_or_equal_2_10 = lambda: True
    from transformers.modeling_utils import PreTrainedModel

    def enable(cls, config, *args, **kwargs):  # skips the CUDA and dtype checks only
        config._attn_implementation = "flash_attention_2"
        return config

    PreTrainedModel._check_and_enable_flash_attn_2 = classmethod(enable)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--headkv", required=True, help="a checkout of FYYFU/HeadKV")
    ap.add_argument("--model", required=True, help="the model as a Hugging Face folder transformers 4.37 reads")
    ap.add_argument("--script", choices=("r2", "retrieval"), required=True)
    ap.add_argument("--haystack", required=True, help="a needles folder in the script's layout")
    ap.add_argument("--lengths", required=True)
    ap.add_argument("--depths", required=True)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--provider", default="OpenAI", help="the scripts' model_provider (its period tokens: '.')")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    fake_flash_attn()
    import torch

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    root = Path(args.headkv).resolve() / "Important_Head"
    sys.path.insert(0, str(root))
    script = importlib.import_module("retrieval_head_detection_r2" if args.script == "r2"
                                     else "retrieval_head_detection")
    if args.dtype == "float32":
        load = script.LlamaForCausalLM.from_pretrained

        def fp32(*a, **kw):
            kw["torch_dtype"] = torch.float32
            return load(*a, **kw)

        script.LlamaForCausalLM.from_pretrained = fp32

    records: list[dict] = []
    tester_cls = script.LLMNeedleHaystackTester

    class Recording(tester_cls):
        def decode(self, *a, **kw):
            output, retrieval_score = super().decode(*a, **kw)
            self._last = (list(output), [[float(h[0]) for h in layer] for layer in retrieval_score])
            return output, retrieval_score

        def evaluate_and_log(self, context_length, depth_percent):
            n = len(self.testing_results)
            super().evaluate_and_log(context_length, depth_percent)
            result = self.testing_results[n]
            output, sums = self._last
            records.append({"part": self.haystack_dir_list.index(self.haystack_dir), "length": int(context_length),
                            "depth": float(depth_percent), "tokens": int(len(self.prompt_ids)),
                            "span": [int(self.needle_start), int(self.needle_end)], "response_ids": output,
                            "score": float(result["score"]), "success": bool(result["score"] > 50), "sums": sums})

    out_path = Path(args.out).resolve()
    haystack = str(Path(args.haystack).resolve())
    model = str(Path(args.model).resolve())
    with tempfile.TemporaryDirectory() as work:
        os.chdir(work)
        os.makedirs("head_score")
        task = {"task": "golden"} if args.script == "r2" else {}  # the retrieval script's tester takes no task
        tester = Recording(model_name=model, haystack_dir=haystack, model_provider=args.provider, **task,
                           save_contexts=False, save_results=False, print_ongoing_status=False,
                           context_lengths=[int(x) for x in args.lengths.split(",")],
                           document_depth_percents=[int(x) for x in args.depths.split(",")])
        tester.start_test(argparse.Namespace(s_len=0, e_len=10 ** 9))
    first = 1 if args.script == "retrieval" else 0  # the retrieval script's needle i reads part{i + 1}
    out = {"script": f"Important_Head/retrieval_head_detection{'_r2' if args.script == 'r2' else ''}.py",
           "dtype": args.dtype, "provider": args.provider, "lengths": args.lengths, "depths": args.depths,
           "first_part": first, "haystack": Path(haystack).name, "probes": records}
    out_path.write_text(json.dumps(out) + "\n")
    print(f"wrote {args.out}: {len(records)} probes, {sum(r['success'] for r in records)} successes")


if __name__ == "__main__":
    main()
