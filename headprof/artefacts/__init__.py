"""Artefacts: the profile document (profile) and what is made from it: comparisons (compare), other tools' formats
(interop), heatmaps (plots)."""
