# Per-image explanations: one job per model, shard and method; the CAM family's members
# (registry.CAM_FAMILY) come from one job, since one run of their graph gives every variant.
# Targets come from the shard's predictions (no second forward pass).
CAM_FAMILY = [m for m in registry.CAM_FAMILY if m in METHODS]
SINGLE_METHODS = [m for m in METHODS if m not in CAM_FAMILY]


rule explain:
    input:
        unpack(model_files),
        manifest=f"{OUT}/images/{{shard}}.json",
        predictions=f"{OUT}/{{model}}/predictions/{{shard}}.json",
    output:
        directory(f"{OUT}/{{model}}/{{method}}/{{shard}}"),
    log:
        f"{OUT}/logs/explain/{{model}}/{{method}}/{{shard}}.log",
    benchmark:
        f"{OUT}/benchmarks/explain/{{model}}/{{method}}/{{shard}}.tsv"
    wildcard_constraints:
        method="|".join(SINGLE_METHODS) or "(?!)",
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
        " --manifest {input.manifest:q} --predictions {input.predictions:q}"
        " --out-dir {output:q} --options {params.options:q}"
        " --device {params.device} --threads {threads} --batch-size {params.batch_size}"
        " 2> {log:q}"


if CAM_FAMILY:

    rule explain_cam_family:
        input:
            unpack(model_files),
            manifest=f"{OUT}/images/{{shard}}.json",
            predictions=f"{OUT}/{{model}}/predictions/{{shard}}.json",
        output:
            [directory(f"{OUT}/{{model}}/{method}/{{shard}}") for method in CAM_FAMILY],
        log:
            f"{OUT}/logs/explain/{{model}}/cam_family/{{shard}}.log",
        benchmark:
            f"{OUT}/benchmarks/explain/{{model}}/cam_family/{{shard}}.tsv"
        conda:
            "../../envs/core.yaml"
        threads: config["threads"]
        resources:
            mem_mb=mem_mb,
            runtime=60,
            gpu=GPU_JOBS,
        params:
            methods=CAM_FAMILY,
            options=cam_family_options,
            device=config["device"],
            batch_size=config["batch_size"],
        shell:
            "cnnviz --record-failures explain --method {params.methods}"
            " --card {input.card:q} --manifest {input.manifest:q}"
            " --predictions {input.predictions:q} --out-dir {output:q}"
            " --options {params.options:q} --device {params.device} --threads {threads}"
            " --batch-size {params.batch_size} 2> {log:q}"
