"""Defaults shared by every entry point (CLI, API, eval), so that they cannot drift apart.

WINDOW: the observation window (last prompt tokens whose attention chooses what each head keeps; always
kept). With chat-templated prompts the last 8 tokens are mostly the template's tail and see little of
the question; 16 reaches into it. Measured on SmolLM2-135M at budget 64 (docs/results.md): on tuning
needles (seed 2000) window 8/16/32 found 5/7/7 of 18 with HeadKV-r2 and 3/7/6 with SnapKV, and on the
30 eval needles (seed 1000) window 16 raised HeadKV-r2 from 10 to 18 and SnapKV from 7 to 14.
KERNEL: max-pool width over positions (SnapKV's clustering). BETA: HeadKV's beta, the paper's default.
SPREAD, DECAY: the in-head selection every scorer-based method uses unless told otherwise (`methods.base.
pooled_scores`); SELECTION records them in results, and OLD_SELECTION is what results made before they were
recorded used (SnapKV's rule: the pooled score alone).
"""

WINDOW = 16
KERNEL = 7
BETA = 1.2
SPREAD = 0
DECAY = 0.8
SELECTION = {"spread": SPREAD, "decay": DECAY}
OLD_SELECTION = {"spread": 0, "decay": 0.0}
