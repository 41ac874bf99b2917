# Channel grids per image for every layer up to `grids_all_up_to` images in the run, beyond
# that for `grids_spread` layers spread over the depth (activations.grid_layers); resolved here,
# so that adding images reruns the jobs only when the run crosses that size. Stats: every layer.
ACTIVATIONS = config["activations"]
GRIDS = (
    ACTIVATIONS["grids"]
    if ACTIVATIONS["grids"] != "auto"
    else (
        "all"
        if len(IMAGE_IDS) <= ACTIVATIONS["grids_all_up_to"]
        else {"spread": ACTIVATIONS["grids_spread"]}
    )
)


rule activations:
    input:
        unpack(model_files),
        manifest=f"{OUT}/images/{{shard}}.json",
    output:
        directory(f"{OUT}/{{model}}/activations/{{shard}}"),
    log:
        f"{OUT}/logs/activations/{{model}}/{{shard}}.log",
    benchmark:
        f"{OUT}/benchmarks/activations/{{model}}/{{shard}}.tsv"
    conda:
        "../../envs/core.yaml"
    threads: config["threads"]
    resources:
        mem_mb=mem_mb,
        runtime=30,
        gpu=GPU_JOBS,
    params:
        options=json.dumps(
            {
                **{k: v for k, v in ACTIVATIONS.items() if not k.startswith("grids_")},
                "grids": GRIDS,
            },
            sort_keys=True,
        ),
        device=config["device"],
        batch_size=config["batch_size"],
    shell:
        "cnnviz --record-failures activations --card {input.card:q}"
        " --manifest {input.manifest:q} --out-dir {output:q} --options {params.options:q}"
        " --device {params.device} --threads {threads} --batch-size {params.batch_size}"
        " 2> {log:q}"


rule sparsity:
    input:
        per_shard(f"{OUT}/{{{{model}}}}/activations/{{shard}}"),
    output:
        f"{OUT}/{{model}}/activations/sparsity.png",
    log:
        f"{OUT}/logs/sparsity/{{model}}.log",
    # One small plot from the shards' statistics: on a cluster, not worth a submission.
    localrule: True
    conda:
        "../../envs/core.yaml"
    shell:
        "cnnviz --record-failures sparsity --activations {input:q} --out {output:q} 2> {log:q}"
