"""Names of the tables and figures the DAG makes (torch-free, read while the DAG is built)."""

TABLE_NAMES = ["linf", "l2", "lmt", "cost", "cross", "audit"]
FIGURE_NAMES = [
    "certified_accuracy_l2",
    "certified_accuracy_linf",
    "radius_vs_error_l2",
    "radius_vs_error_linf",
    "tradeoff",
    "training_curves",
    "ours_vs_published",
    "cost",
    "lipschitz_vs_accuracy",
    "radius_distribution",
]
#: Figures a config asks for by name in ``extra_figures`` (a paper's own figure, meaningless elsewhere).
OPTIONAL_FIGURE_NAMES = ["lipsdp_tradeoff"]
