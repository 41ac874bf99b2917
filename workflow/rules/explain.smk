rule explain:
    input:
        unpack(model_files),
        manifest=f"{OUT}/images/{{shard}}.json",
    output:
        directory(f"{OUT}/{{model}}/{{method}}/{{shard}}"),
    log:
        f"{OUT}/logs/explain/{{model}}/{{method}}/{{shard}}.log",
    benchmark:
        f"{OUT}/benchmarks/explain/{{model}}/{{method}}/{{shard}}.tsv"
    conda:
        "../../envs/core.yaml"
    threads: config["threads"]
    resources:
        mem_mb=mem_mb,
        runtime=60,
        gpu=GPU_JOBS,
    params:
        options=method_options,
        device=config["device"],
        batch_size=config["batch_size"],
    shell:
        "cnnviz --record-failures explain --method {wildcards.method} --card {input.card:q}"
        " --manifest {input.manifest:q} --out-dir {output:q} --options {params.options:q}"
        " --device {params.device} --threads {threads} --batch-size {params.batch_size}"
        " 2> {log:q}"
