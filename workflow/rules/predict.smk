rule predict:
    input:
        unpack(model_files),
        manifest=f"{OUT}/images/{{shard}}.json",
    output:
        f"{OUT}/{{model}}/predictions/{{shard}}.json",
    log:
        f"{OUT}/logs/predict/{{model}}/{{shard}}.log",
    benchmark:
        f"{OUT}/benchmarks/predict/{{model}}/{{shard}}.tsv"
    conda:
        "../../envs/core.yaml"
    threads: config["threads"]
    resources:
        mem_mb=mem_mb,
        runtime=30,
        gpu=GPU_JOBS,
    params:
        top_k=config["predictions"]["top_k"],
        device=config["device"],
        batch_size=config["batch_size"],
    shell:
        "cnnviz --record-failures predict --card {input.card:q} --manifest {input.manifest:q}"
        " --out {output:q} --top-k {params.top_k} --device {params.device}"
        " --threads {threads} --batch-size {params.batch_size} 2> {log:q}"
