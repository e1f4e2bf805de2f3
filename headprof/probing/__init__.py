"""Probing: needle probes rendered into prompts, decoded by the model, and its attention turned into head scores.

probes (probe sets), haystack (filler text), presets (the official protocols), families/ (one module per probe
family), answers (answer checks), scoring (running probes into a profile), reference (the naive implementation the
tests compare with)."""
