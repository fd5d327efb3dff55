"""Model merging: mergekit's methods and YAML configs, streamed tensor by tensor.

    from lctool.merge import merge, MergeOptions, load_config, quick_config
    merge("merge.yml", "out/", MergeOptions(seed=1))
"""

from lctool.merge.config import MergeConfig, load_config, parse_config
from lctool.merge.methods import METHODS, MergeMethod, get_method, method_names
from lctool.merge.quick import quick_config
from lctool.merge.run import MergeOptions, merge, plan_merge

__all__ = [
    "METHODS",
    "MergeConfig",
    "MergeMethod",
    "MergeOptions",
    "get_method",
    "load_config",
    "merge",
    "method_names",
    "parse_config",
    "plan_merge",
    "quick_config",
]
