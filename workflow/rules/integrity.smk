# Included last: every hashed artefact is checked while the DAG is built. A damaged one
# (hash missing or wrong) is removed together with every file made from it, so the jobs
# that made them run again instead of a damaged file being used.
from certbench.storage import remove_damaged

_EVALUATED = ["certify.json", "attack.json", "record.json", "samples.csv"]
_PER_RUN = {  # per-run file: the per-run files made from it
    "run.json": ["model.pt", "train.json", *_EVALUATED],
    "model.pt": ["train.json", *_EVALUATED],
    "train.json": ["model.pt", *_EVALUATED],
    "certify.json": ["record.json", "samples.csv"],
    "attack.json": ["record.json", "samples.csv"],
    "record.json": ["samples.csv"],
    "samples.csv": ["record.json"],
}


def derived_files():
    # the report's first page (front_page) is made from summary.csv and audit.csv
    reports = [*rules.tables.output, *rules.figures.output, *rules.front_page.output]
    collected = [
        *rules.collect.output,
        *rules.audit.output,
        *rules.audit_check.output,
        *rules.history.output,
        *reports,
    ]
    graph = {}
    for run in RUNS:
        for name, made_from_it in _PER_RUN.items():
            graph[result(run.path, name)] = [result(run.path, other) for other in made_from_it] + collected
    for made in (*rules.collect.output, *rules.audit.output, *rules.published.output):
        graph[made] = [*rules.audit_check.output, *reports]
    for made in rules.history.output:  # history.csv: the training curves are drawn from it
        graph[made] = list(rules.figures.output)
    for made in rules.front_page.output:  # the report's first page: made from nothing else that is checked
        graph[made] = []
    return graph


# Only in the main process: a job that Snakemake runs in a process of its own (a cluster job)
# parses this file again, and such a parse while another job is between writing a file and
# writing its hash would take the fresh file for a damaged one and delete it (seen as a
# MissingOutputException).
if workflow.is_main_process:
    for damaged in remove_damaged(derived_files()):
        logger.warning(f"certbench: {damaged} was damaged (hash mismatch); it will be made again")
