rule report:
    input:
        cards=expand(f"{OUT}/models/{{model}}/model.json", model=MODELS),
        predictions=expand(
            per_shard(f"{OUT}/{{{{model}}}}/predictions/{{shard}}.json"), model=MODELS
        ),
        activations=expand(
            per_shard(f"{OUT}/{{{{model}}}}/activations/{{shard}}"), model=MODELS
        ),
        sparsity=expand(f"{OUT}/{{model}}/activations/sparsity.png", model=MODELS),
        manifests=per_shard(f"{OUT}/images/{{shard}}.json"),
        explanations=expand(
            per_shard(f"{OUT}/{{{{model}}}}/{{{{method}}}}/{{shard}}"),
            model=MODELS,
            method=METHODS,
        ),
        pictures=expand(
            per_shard(f"{OUT}/{{{{model}}}}/pictures/{{{{method}}}}/{{shard}}"),
            model=MODELS,
            method=METHODS,
        ),
        filters=filter_pictures,
        class_models=class_model_pictures,
        atlas=expand(
            f"{OUT}/{{model}}/atlas/layers",
            model=MODELS if config["atlas"]["enabled"] else [],
        ),
        metrics=metrics_summaries(),
        audit=audit_comparison(),
    output:
        index=f"{REPORT_DIR}/index.html",
        pages=expand(f"{REPORT_DIR}/{{model}}.html", model=MODELS),
    log:
        f"{OUT}/logs/report.log",
    conda:
        "../../envs/core.yaml"
    params:
        results=results_root,
        models=MODELS,
        config=json.dumps(config, sort_keys=True),
        audit=audit_flag,
    shell:
        "cnnviz report --results {params.results:q} --index {output.index:q}"
        " --config {params.config:q} --models {params.models:q} {params.audit}"
        " 2> {log:q}"
