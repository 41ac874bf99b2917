# A checkpoint: layer names (for filters) are known once the model is exported.
# What an export reads is its input: an onnx: file and its external data files, checksummed
# (params.digest), and the model's config entry (params.spec).
checkpoint export:
    input:
        model_source_file,
    output:
        onnx=f"{OUT}/models/{{model}}/model.onnx",
        card=f"{OUT}/models/{{model}}/model.json",
    log:
        f"{OUT}/logs/export/{{model}}.log",
    benchmark:
        f"{OUT}/benchmarks/export/{{model}}.tsv"
    conda:
        "../../envs/export.yaml"
    threads: config["threads"]
    params:
        spec=model_spec,
        digest=model_digest,
    shell:
        "cnnviz --record-failures export --name {wildcards.model} --spec {params.spec:q}"
        " --card {output.card:q} --threads {threads} 2> {log:q}"
