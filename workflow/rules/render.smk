# The pictures of the per-image maps: one job per model and shard for every method, drawn from
# the explain step's arrays (results/{model}/{method}/{shard}/maps.npy + index.json) and the
# staged images, for the rows `report.pictures` selects (all | failures | none | {top: N} per
# shard). One job per shard, not per method and shard: the fixed cost of a job (process,
# imports: ~1-2 s) would otherwise outweigh drawing its few pictures (benchmarks/PIPELINE.md).
# One thread each: Snakemake runs them beside the ONNX Runtime jobs.


if METHODS:

    rule render:
        input:
            card=f"{OUT}/models/{{model}}/model.json",
            manifest=f"{OUT}/images/{{shard}}.json",
            staged=f"{OUT}/images/{{shard}}",
            predictions=f"{OUT}/{{model}}/predictions/{{shard}}.json",
            maps=[f"{OUT}/{{model}}/{method}/{{shard}}" for method in METHODS],
        output:
            [
                directory(f"{OUT}/{{model}}/pictures/{method}/{{shard}}")
                for method in METHODS
            ],
        log:
            f"{OUT}/logs/render/{{model}}/{{shard}}.log",
        benchmark:
            f"{OUT}/benchmarks/render/{{model}}/{{shard}}.tsv"
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
