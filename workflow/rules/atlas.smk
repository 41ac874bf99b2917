# Feature atlas (Zeiler & Fergus fig. 2) as a map-reduce over the run's images: atlas_map keeps
# each channel's top-k per shard; atlas_reduce (one job per model, every atlas layer: layer names
# are only known once the model is exported) merges them, projects the winners and tiles them.


rule atlas_map:
    input:
        unpack(model_files),
        manifest=f"{OUT}/images/{{shard}}.json",
    output:
        f"{OUT}/{{model}}/atlas/shards/{{shard}}.json",
    log:
        f"{OUT}/logs/atlas_map/{{model}}/{{shard}}.log",
    benchmark:
        f"{OUT}/benchmarks/atlas_map/{{model}}/{{shard}}.tsv"
    conda:
        "../../envs/core.yaml"
    threads: config["threads"]
    resources:
        mem_mb=mem_mb,
        runtime=30,
        gpu=GPU_JOBS,
    params:
        # only what the map depends on: a change to the channel choice reruns the reduce alone
        options=json.dumps(
            {k: config["atlas"][k] for k in ("layers", "top_k")}, sort_keys=True
        ),
        device=config["device"],
        batch_size=config["batch_size"],
    shell:
        "cnnviz --record-failures atlas-map --card {input.card:q} --manifest {input.manifest:q}"
        " --out {output:q} --options {params.options:q} --device {params.device}"
        " --threads {threads} --batch-size {params.batch_size} 2> {log:q}"


rule atlas_reduce:
    input:
        unpack(model_files),
        shards=per_shard(f"{OUT}/{{{{model}}}}/atlas/shards/{{shard}}.json"),
        manifests=per_shard(f"{OUT}/images/{{shard}}.json"),
    output:
        directory(f"{OUT}/{{model}}/atlas/layers"),
    log:
        f"{OUT}/logs/atlas_reduce/{{model}}.log",
    benchmark:
        f"{OUT}/benchmarks/atlas_reduce/{{model}}.tsv"
    conda:
        "../../envs/core.yaml"
    threads: config["threads"]
    resources:
        mem_mb=mem_mb,
        runtime=60,
        gpu=GPU_JOBS,
    params:
        options=json.dumps(config["atlas"], sort_keys=True),
        device=config["device"],
        batch_size=config["batch_size"],
    shell:
        "cnnviz --record-failures atlas-reduce --card {input.card:q} --shards {input.shards:q}"
        " --manifests {input.manifests:q} --out-dir {output:q} --options {params.options:q}"
        " --device {params.device} --threads {threads} --batch-size {params.batch_size}"
        " 2> {log:q}"
