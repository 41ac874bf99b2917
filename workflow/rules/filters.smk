# Filter visualization (activation maximization): one job per model, layer and mode, independent
# of the input images. Layers default to a few spread shallow -> deep (known after export).
# Neuron pictures (filters.neurons) are the same jobs with each filter's centre unit maximized.


rule filters:
    input:
        unpack(model_files),
    output:
        png=f"{OUT}/{{model}}/filters/{{layer}}.{{mode}}.png",
        npy=f"{OUT}/{{model}}/filters/{{layer}}.{{mode}}.npy",
        json=f"{OUT}/{{model}}/filters/{{layer}}.{{mode}}.json",
        curve=f"{OUT}/{{model}}/filters/{{layer}}.{{mode}}.curve.png",
    log:
        f"{OUT}/logs/filters/{{model}}/{{layer}}.{{mode}}.log",
    benchmark:
        f"{OUT}/benchmarks/filters/{{model}}/{{layer}}.{{mode}}.tsv"
    conda:
        "../../envs/core.yaml"
    threads: config["threads"]
    resources:
        mem_mb=mem_mb,
        runtime=60,
        gpu=GPU_JOBS,
    params:
        options=filter_options,
        out_dir=parent_folder,
        device=config["device"],
        objective="",
    shell:
        "cnnviz --record-failures filters --card {input.card:q} --layer {wildcards.layer:q}"
        " --mode {wildcards.mode} --out-dir {params.out_dir:q} --options {params.options:q}"
        " {params.objective}--device {params.device} --threads {threads} 2> {log:q}"


use rule filters as neurons with:
    output:
        png=f"{OUT}/{{model}}/neurons/{{layer}}.{{mode}}.png",
        npy=f"{OUT}/{{model}}/neurons/{{layer}}.{{mode}}.npy",
        json=f"{OUT}/{{model}}/neurons/{{layer}}.{{mode}}.json",
        curve=f"{OUT}/{{model}}/neurons/{{layer}}.{{mode}}.curve.png",
    log:
        f"{OUT}/logs/neurons/{{model}}/{{layer}}.{{mode}}.log",
    benchmark:
        f"{OUT}/benchmarks/neurons/{{model}}/{{layer}}.{{mode}}.tsv"
    params:
        options=filter_options,
        out_dir=parent_folder,
        device=config["device"],
        objective="--neurons ",
