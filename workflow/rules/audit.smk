# Scheduled audits (config run_id, baseline): a stamped run freezes what it found in
# {output}/runs/{run_id}/snapshot.json, compares it with its baseline's snapshot (the report's
# "What changed since the last audit") and updates the index of runs, {output}/runs/index.html.
if RUN_ID:

    rule audit_snapshot:
        input:
            cards=expand(f"{OUT}/models/{{model}}/model.json", model=MODELS),
            predictions=expand(
                per_shard(f"{OUT}/{{{{model}}}}/predictions/{{shard}}.json"),
                model=MODELS,
            ),
            explanations=expand(
                per_shard(f"{OUT}/{{{{model}}}}/{{{{method}}}}/{{shard}}"),
                model=MODELS,
                method=METHODS,
            ),
            manifests=per_shard(f"{OUT}/images/{{shard}}.json"),
        output:
            f"{RUN_DIR}/snapshot.json",
        log:
            f"{OUT}/logs/audit/{RUN_ID}.snapshot.log",
        conda:
            "../../envs/core.yaml"
        params:
            results=results_root,
            models=MODELS,
            run_id=RUN_ID,
            baseline=BASELINE,
            config=json.dumps(config, sort_keys=True),
        shell:
            "cnnviz audit-snapshot --results {params.results:q} --run-id {params.run_id:q}"
            " --baseline={params.baseline:q} --config {params.config:q}"
            " --models {params.models:q} --out {output:q} 2> {log:q}"

    rule audit_index:
        input:
            snapshot=f"{RUN_DIR}/snapshot.json",
            report=f"{REPORT_DIR}/index.html",
        output:
            f"{OUT}/runs/index.html",
        log:
            f"{OUT}/logs/audit/{RUN_ID}.index.log",
        conda:
            "../../envs/core.yaml"
        params:
            runs=parent_folder,
            title=config["report"]["title"],
        shell:
            "cnnviz audit-index --runs-dir {params.runs:q} --out {output:q}"
            " --title {params.title:q} 2> {log:q}"


if BASELINE:

    rule audit_compare:
        input:
            baseline=f"{OUT}/runs/{BASELINE}/snapshot.json",
            current=f"{RUN_DIR}/snapshot.json",
        output:
            f"{RUN_DIR}/audit.json",
        log:
            f"{OUT}/logs/audit/{RUN_ID}.compare.log",
        conda:
            "../../envs/core.yaml"
        shell:
            "cnnviz audit-compare --baseline {input.baseline:q} --current {input.current:q}"
            " --out {output:q} 2> {log:q}"
