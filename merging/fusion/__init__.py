"""Heterogeneous fusion: experts of other tokenizers and architectures join through their
token distributions (FuseLLM arXiv 2401.10491, FuseChat arXiv 2402.16107).

* `merging.fusion.summary`: an expert's response summary on a probe set (its greedy responses and
  their top-k next-token distributions), saved and loaded as one file;
* `merging.fusion.align`: token-sequence alignment (DTW) and vocabulary mapping across tokenizers;
* `merging.fusion.fuse`: MinCE / AvgCE fusion of the aligned distributions of several sources;
* `merging.fusion.distill`: distillation of the fused distributions into a copy of the pivot model;
* `merging.fusion.replay`: the pivot's own responses as targets, so the copy keeps its other skills;
* `merging.fusion.refusal`: the cross-entropy rule a peer checks a fused contribution with.

Pure: no network; files only through `merging.atomic`.
"""

from merging.errors import UmmError

# Parameters a fused copy leaves as the pivot has them by default, as the zoo's experts do: a copy
# that trains them moves every domain's inputs, and its task vector then disturbs the other experts
# in a merge (docs/benchmarks.md, "Heterogeneous fusion").
SHARED_PARAMETERS = ("embed_tokens", "norm")


class FusionError(UmmError):
    """A summary, probe set or fusion setting that cannot be used."""
