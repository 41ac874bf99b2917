# Class models (Simonyan et al. 2014): one job per model, after its predictions (the run's most
# frequent top-1 classes are shown, then any classes the config names).


rule class_models:
    input:
        unpack(model_files),
        predictions=lambda wildcards: per_shard(
            f"{OUT}/{wildcards.model}/predictions/{{shard}}.json"
        ),
    output:
        png=f"{OUT}/{{model}}/class_models/class_models.png",
        npy=f"{OUT}/{{model}}/class_models/class_models.npy",
        json=f"{OUT}/{{model}}/class_models/class_models.json",
        curve=f"{OUT}/{{model}}/class_models/class_models.curve.png",
    log:
        f"{OUT}/logs/class_models/{{model}}.log",
    benchmark:
        f"{OUT}/benchmarks/class_models/{{model}}.tsv"
    conda:
        "../../envs/core.yaml"
    threads: config["threads"]
    resources:
        mem_mb=mem_mb,
        runtime=60,
        gpu=GPU_JOBS,
    params:
        options=json.dumps(config["class_models"], sort_keys=True),
        out_dir=parent_folder,
        device=config["device"],
    shell:
        "cnnviz --record-failures class-models --card {input.card:q}"
        " --predictions {input.predictions:q} --out-dir {params.out_dir:q}"
        " --options {params.options:q} --device {params.device} --threads {threads} 2> {log:q}"
