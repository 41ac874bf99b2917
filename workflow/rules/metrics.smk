# Explanation-quality metrics (scripts/cnnviz/metrics): per model, shard and method, then a
# summary per model. "random" (random maps) is the reference every method is compared with.
# Helpers: common.smk (METRIC_METHODS, metrics_settings, metrics_inputs, metrics_summaries).


rule metrics:
    input:
        unpack(model_files),
        manifest=f"{OUT}/images/{{shard}}.json",
        boxes=boxes_file,
        maps=f"{OUT}/{{model}}/{{method}}/{{shard}}",
    output:
        f"{OUT}/{{model}}/metrics/{{shard}}/{{method}}.json",
    log:
        f"{OUT}/logs/metrics/{{model}}/{{method}}/{{shard}}.log",
    benchmark:
        f"{OUT}/benchmarks/metrics/{{model}}/{{method}}/{{shard}}.tsv"
    conda:
        "../../envs/core.yaml"
    threads: config["threads"]
    resources:
        mem_mb=mem_mb,
        runtime=60,
        gpu=GPU_JOBS,
    params:
        options=method_options,
        metrics=metrics_settings,
        device=config["device"],
        batch_size=config["batch_size"],
        boxes=boxes_option,
    shell:
        "cnnviz --record-failures metrics --method {wildcards.method} --card {input.card:q}"
        " --manifest {input.manifest:q} --maps-dir {input.maps:q} --out {output:q}"
        " --options {params.options:q} --metrics {params.metrics:q}"
        " --device {params.device} --threads {threads} --batch-size {params.batch_size}"
        " {params.boxes}"
        " 2> {log:q}"


rule metrics_reference:
    input:
        unpack(model_files),
        manifest=f"{OUT}/images/{{shard}}.json",
        boxes=boxes_file,
    output:
        f"{OUT}/{{model}}/metrics/{{shard}}/random.json",
    log:
        f"{OUT}/logs/metrics/{{model}}/random/{{shard}}.log",
    benchmark:
        f"{OUT}/benchmarks/metrics/{{model}}/random/{{shard}}.tsv"
    conda:
        "../../envs/core.yaml"
    threads: config["threads"]
    resources:
        mem_mb=mem_mb,
        runtime=30,
        gpu=GPU_JOBS,
    params:
        options=json.dumps({"target": config["methods"]["target"]}, sort_keys=True),
        metrics=metrics_settings_for(METRIC_REFERENCE),
        device=config["device"],
        batch_size=config["batch_size"],
        boxes=boxes_option,
    shell:
        "cnnviz --record-failures metrics --method random --card {input.card:q}"
        " --manifest {input.manifest:q} --out {output:q}"
        " --options {params.options:q} --metrics {params.metrics:q}"
        " --device {params.device} --threads {threads} --batch-size {params.batch_size}"
        " {params.boxes}"
        " 2> {log:q}"


rule metrics_summary:
    input:
        metrics_inputs,
    output:
        summary=f"{OUT}/{{model}}/metrics/summary.json",
        curves=f"{OUT}/{{model}}/metrics/deletion_insertion.png",
        randomization=f"{OUT}/{{model}}/metrics/randomization.png",
    log:
        f"{OUT}/logs/metrics_summary/{{model}}.log",
    benchmark:
        f"{OUT}/benchmarks/metrics_summary/{{model}}.tsv"
    conda:
        "../../envs/core.yaml"
    resources:
        runtime=10,
    params:
        out_dir=parent_folder,
    shell:
        "cnnviz --record-failures metrics-summary --inputs {input:q} --out-dir {params.out_dir:q} 2> {log:q}"
