"""`jaxmerge moe`: a mixture of experts from dense fine-tunes of one base, from mergekit-moe's configuration.

The rooms: `config` reads and checks mergekit-moe 0.1.5's YAML; `architectures`
lists the output architectures (Mixtral, DeepSeek MoE, Qwen MoE, Qwen3 MoE) and
picks one as mergekit does; `gates` initialises the routers from prompts (or at
random); `build` lays the output out and streams it through the merge engine.
"""

from jaxmerge.tools.moe.architectures import ARCHITECTURES, MoeArchitecture, select_architecture
from jaxmerge.tools.moe.build import CONFIG_FILE, MoePlan, build_moe, dry_run, plan_moe
from jaxmerge.tools.moe.config import GATE_MODES, Expert, MoeConfig, MoeError, load_moe_config, parse_moe_config

__all__ = [
    "ARCHITECTURES", "CONFIG_FILE", "GATE_MODES", "Expert", "MoeArchitecture", "MoeConfig", "MoeError", "MoePlan",
    "build_moe", "dry_run", "load_moe_config", "parse_moe_config", "plan_moe", "select_architecture",
]
