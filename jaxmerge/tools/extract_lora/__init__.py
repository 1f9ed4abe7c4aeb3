"""Extract a PEFT LoRA adapter from a fine-tune and its base model: mergekit-extract-lora in JAX.

Each weight's task vector (fine-tune - base) is factored by a truncated SVD,
Delta ~= B @ A, and the factors are saved as a PEFT LoRA adapter whose scaling
is 1 (lora_alpha = r for every module), so that `PeftModel.from_pretrained(base,
adapter)` computes base + B @ A. Rules of mergekit 0.1.5's
`mergekit/scripts/extract_lora.py`, followed rule for rule:

* Which modules (`plan_extraction`): every module of the model (transformers'
  class built on the meta device, `_make_dummy_model`, in `named_modules()`
  order) that has a weight in the checkpoint. `nn.Linear`, `nn.Conv1d`,
  `nn.Conv2d` and `nn.Embedding` are decomposed; any other module with a weight
  (norms, GPT-2's `Conv1D`) is "undecomposable": saved whole in
  `modules_to_save` (by its last name component), or dropped with
  `--skip-undecomposable`. So 1-D tensors (norm weights) are never factored:
  they are copied whole from the fine-tune, whether or not they differ from the
  base, unless dropped.
* Embeddings: without `--embed-lora` the input and output embeddings and every
  `nn.Embedding` go to `modules_to_save` (unless an exclude regex matches them;
  include regexes do not apply to them). With it they are decomposed: an
  `nn.Embedding` as `lora_embedding_A` (r, vocab) / `lora_embedding_B` (dim, r) of
  the transposed delta, the output embedding (a Linear) as a Linear. Differing
  vocabulary sizes force `--no-embed-lora` (warning) and the card says to resize.
* `--save-module NAME`: modules named NAME (full name or last component) are
  saved whole. A name once in modules_to_save applies to every later module
  with that last component (mergekit's order-dependent rule, kept).
* include/exclude regexes (`re.search` on the module name) decide which of the
  remaining modules are extracted.
* Rank (`TaskVectorDecompositionTask`): min(--max-rank, min(m, n)); with
  `--sv-epsilon` > 0 further capped by the number of singular values above it.
  A (r, in) = sqrt(S) Vh and B (out, r) = U sqrt(S) with `--distribute-scale`
  (default), A = S Vh and B = U without. A Linear's bias delta is saved as
  `lora_B.bias`. Factors are saved in the fine-tune's dtype.
* Config (`make_config_dict`): r = lora_alpha = the largest rank used;
  rank_pattern = alpha_pattern = {module: rank} for modules of another rank;
  target_modules = the last name components of the decomposed modules;
  modules_to_save as collected; task_type CAUSAL_LM, use_rslora false,
  lora_dropout 0, fan_in_fan_out false, inference_mode true,
  base_model_name_or_path = the base as given.

Where jaxmerge differs, and why: the task vector is computed in float32 (mergekit
subtracts in the checkpoint's dtype, rounding a bfloat16 delta); a module whose
rank falls to 0 under `--sv-epsilon` is left out (mergekit writes an r = 0 that
PEFT refuses); conv layers get PEFT's conv layout, A (r, in, *kernel) and B
(out, r, 1, ...) (mergekit runs a batched SVD over the kernel's first axis,
which PEFT cannot load); `lora_bias: true` is set when bias deltas are saved, so
that PEFT applies them (mergekit saves them without it, and PEFT drops them);
target_modules is sorted (mergekit's comes from a set).

Module types: for the architectures of `NAME_TYPED_ARCHITECTURES` (Llama, Mistral,
Qwen2/3, Gemma, ...; with an untied output embedding) the tensors' names and
shapes give exactly what transformers' classes give (`_modules_from_names`),
without importing torch; for the others the model class is built on the meta
device as mergekit does (`_modules_from_transformers`), and where transformers
is missing or does not know the architecture the names are used.

Decomposition (`--decomposition`): `exact` is the full SVD (`jnp.linalg.svd`,
as mergekit's `torch.linalg.svd`); `randomized` is Halko, Martinsson & Tropp
(2011, arXiv:0909.4061), Algorithms 4.4 and 5.1: a Gaussian sketch of
rank + p columns, p = max(10, rank // 2) (`oversampling`), at most q = 3 power
iterations (`POWER_ITERATIONS`) re-orthonormalised by QR each half step, then
the SVD of the small projected matrix. The iterations stop early once one of
them lowers the squared error of the rank-r approximation by less than 1% of
what remains (`CONVERGED`: the sketch has converged; the check reuses the
products the next iteration needs), unless what remains is under 1e-5 of the
total (`RESOLVABLE`), where float32 cannot tell a gain from rounding and all q
run. That rule kept the Frobenius error within 0.7% of the exact truncated SVD's
(the `--decomposition exact` error at the same rank), measured by
`python -m benchmarks.randomized_svd_error` at 384 x 256 and 1024 x 512, ranks 8
to 128, rank/min(m, n) up to 1/4 (results/randomized_svd_error.json): 0.66% at
worst on Gaussian matrices (a flat spectrum), 0.55% on low rank + noise, 0.59% on
a rank-48 block over small noise, 0.17% on a j^-0.5 power law, 0.03%
on exponential and 0.00% on j^-2 spectra (tests/test_extract_lora.py checks the
1% bound). p = rank (before) gave 0.52-0.68% for 4/3 of the matrix products;
p = rank // 4 reached 1.25% on that block. `auto` (the default) is randomized
when the sketch is at most a quarter of the matrix's smaller side (rank + p <= min(m, n) / 4), where it is
several times faster, and exact otherwise. Everything is jitted and computed in
float32 (float64 for float64 inputs when JAX has x64 enabled); the random
sketch of each module is drawn from `fold_in(key(seed), crc32(module name))`.

Threads: on the CPU, the factorizations inside the kernels (QR, eigh, SVD) run on SciPy's LAPACK,
whose thread pool competes with XLA's for the cores. A run whose decompositions are all randomized,
or exact on matrices under 512 on their smaller side, limits LAPACK to one thread for its length
(`lapack_threads`, `jaxmerge.engine.lapack_threads`; measured on 2 cores only). On the 2-core CI VM
that made the randomized kernel 1.3-1.8x faster, and the rank-64 benchmark's cached run took
2.53-2.76 s with LAPACK on one thread against 3.33-4.30 s without (three runs each, alternating); an
exact SVD of a larger matrix is all LAPACK and keeps its threads (a 2048 x 2048 one ran 1.4x slower
on one).

Ranks from the spectrum (beyond mergekit; `rank_rule`, `choose_ranks`): `--rank-by energy:F`
keeps, per module, the smallest rank whose singular values hold >= F of the task vector's
energy (sum of squared singular values / squared Frobenius norm; by Eckart-Young the best
rank-k approximation keeps exactly the top k values' energy); `--rank-budget N` spends N LoRA
parameters in all (sum over modules of rank x (rows + cols)) greedily by error removed per
parameter, sigma^2 / (rows + cols) (`allocate_budget` states when that is optimal). Both are
capped by --max-rank (and --sv-epsilon when given). A module whose rank is 0 is left out, as
under --sv-epsilon. The adapter records the ranks as PEFT reads them: r = lora_alpha = the
largest, rank_pattern = alpha_pattern = the others (scaling 1 everywhere); the report and the
card name the rule and the LoRA parameters spent.

Streaming: the output tensors' names, shapes and dtypes are all known before any
SVD (ranks are fixed by --max-rank; with --sv-epsilon, --rank-by or --rank-budget a first
pass computes every module's singular values, `_first_pass`), so the adapter file's header is written first and each
module's factors follow as computed (`ShardWriter`), with reading, computing
and writing overlapped (`run_ordered`). Memory is bounded by a few copies of the
largest matrix. The directory appears complete or not at all
(`atomic_directory`).

Layout (one job each; everything public is re-exported here, so `jaxmerge.tools.extract_lora.NAME`
and `jaxmerge.extract_lora` are the import paths):

* `svd`: the jitted kernels (exact and randomized SVD, one matrix's factors and what they keep),
  `decompose`, `ModuleReport`, `LoraFactors`;
* `ranks`: the rank rules (`rank_rule`, `energy_rank`, `allocate_budget`, `choose_ranks`);
* `pytree`: `extract_lora`, the API on JAX pytrees;
* `modules`: which modules a checkpoint has and of what kind;
* `plan`: `plan_extraction` and `ExtractionPlan` (every check that can fail, adapter_config.json);
* `adapter`: `extract_lora_adapter`, the streamed run (first pass, factors, files);
* `report`: the report, the printed table, the command line and the card.
"""

from __future__ import annotations

from jaxmerge.tools.extract_lora.adapter import extract_lora_adapter
from jaxmerge.tools.extract_lora.modules import NAME_TYPED_ARCHITECTURES
from jaxmerge.tools.extract_lora.plan import ExtractionPlan, plan_extraction
from jaxmerge.tools.extract_lora.pytree import extract_lora
from jaxmerge.tools.extract_lora.ranks import (
    ENERGY_RTOL, RankRule, Spectrum, allocate_budget, check_budget, choose_ranks, energy_rank, rank_rule,
)
from jaxmerge.tools.extract_lora.report import REPORT_FILE, command_line, format_report, report_dict
from jaxmerge.tools.extract_lora.svd import (
    DECOMPOSITIONS, DEFAULT_MAX_RANK, EXACT_THREADED_FROM, POWER_ITERATIONS, LoraFactors, ModuleReport,
    choose_decomposition, decompose, lapack_threads, oversampling,
)

__all__ = [
    "DECOMPOSITIONS", "DEFAULT_MAX_RANK", "ENERGY_RTOL", "EXACT_THREADED_FROM", "NAME_TYPED_ARCHITECTURES",
    "POWER_ITERATIONS", "REPORT_FILE", "ExtractionPlan", "LoraFactors", "ModuleReport", "RankRule", "Spectrum",
    "allocate_budget", "check_budget", "choose_decomposition", "choose_ranks", "command_line", "decompose",
    "energy_rank", "extract_lora", "extract_lora_adapter", "format_report", "lapack_threads", "oversampling",
    "plan_extraction", "rank_rule", "report_dict",
]
