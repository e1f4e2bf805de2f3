"""headprof: find the attention heads that matter, write them down as a profile, compress the KV cache.

Library entry points (the CLI is a thin layer over these):

    from headprof import models, probes, scoring, profile
    lm = models.load("smollm2-135m")
    ps = probes.build_probe_set("r2", lengths=[1000], depths=5, seed=0)
    prof = scoring.score(lm, ps, "r2", haystack=probes.Haystack(0))
    profile.save(prof, "r2.json")
"""

__version__ = "0.1.0"
