rule sample_image:
    output:
        f"{OUT}/samples/{{name}}.png",
    log:
        f"{OUT}/logs/sample_image/{{name}}.log",
    # A bundled photo written out in a second: on a cluster, not worth a submission.
    localrule: True
    conda:
        "../../envs/core.yaml"
    shell:
        "cnnviz sample-image --name {wildcards.name} --out {output:q} 2> {log:q}"


rule stage_shard:
    input:
        images=shard_files,
        labels=labels_file,
    output:
        manifest=f"{OUT}/images/{{shard}}.json",
        staged=directory(f"{OUT}/images/{{shard}}"),
    log:
        f"{OUT}/logs/stage_shard/{{shard}}.log",
    conda:
        "../../envs/core.yaml"
    # Memory: the largest image of the shard is decoded whole (common.smk, stage_mem_mb).
    resources:
        mem_mb=stage_mem_mb,
    params:
        ids=shard_ids,
        # every path, the missing ones too: staging lists those under the failed images
        images=shard_paths,
        labels=labels_option,
    shell:
        "cnnviz --record-failures stage --manifest {output.manifest:q} --staged-dir {output.staged:q}"
        " --ids {params.ids} --images {params.images} {params.labels} 2> {log:q}"
