"""certbench: train → certify → attack → record → audit → collect → tables → figures.

Thin on purpose: load and validate the config, include the rules. All science lives in
the certbench library; building this DAG never imports torch.
"""

import sys

from snakemake.utils import min_version

from certbench.config import ConfigError, type_overrides, validate

min_version("9.0")


# `--configfile X` replaces the default config instead of being merged into it, so a
# paper config never inherits the default's data sets or experiments.
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


# `--config` values are typed as in a config file (Snakemake leaves `seeds=[0]` as ["0"]).
try:
    CONFIG = validate(type_overrides(config, workflow.config_settings.config))
except ConfigError as error:
    sys.exit(f"certbench: config error: {error}")


include: "workflow/rules/common.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/external.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/integrity.smk"


rule all:
    default_target: True
    input:
        rules.audit_check.output,
        rules.config_snapshot.output,
        rules.tables.output,
        rules.figures.output,
        rules.front_page.output,
