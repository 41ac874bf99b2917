# The pictures of the per-image maps: one job per model, method and shard, drawn from the
# explain step's arrays (results/{model}/{method}/{shard}/maps.npy + index.json) and the staged
# images, for the rows `report.pictures` selects (all | failures | none | {top: N} per shard).
# One thread each: Snakemake runs them side by side, and beside the ONNX Runtime jobs.


rule render:
    input:
        card=f"{OUT}/models/{{model}}/model.json",
        manifest=f"{OUT}/images/{{shard}}.json",
        staged=f"{OUT}/images/{{shard}}",
        predictions=f"{OUT}/{{model}}/predictions/{{shard}}.json",
        maps=f"{OUT}/{{model}}/{{method}}/{{shard}}",
    output:
        directory(f"{OUT}/{{model}}/pictures/{{method}}/{{shard}}"),
    log:
        f"{OUT}/logs/render/{{model}}/{{method}}/{{shard}}.log",
    benchmark:
        f"{OUT}/benchmarks/render/{{model}}/{{method}}/{{shard}}.tsv"
    conda:
        "../../envs/core.yaml"
    threads: 1
    resources:
        runtime=30,
    params:
        pictures=json.dumps(config["report"]["pictures"], sort_keys=True),
    shell:
        "cnnviz --record-failures render --card {input.card:q} --manifest {input.manifest:q}"
        " --maps-dir {input.maps:q} --predictions {input.predictions:q} --out-dir {output:q}"
        " --pictures {params.pictures:q} 2> {log:q}"
