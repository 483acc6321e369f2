rule labels:
    """Rasterise labelled fields onto the grid and split it into spatial blocks."""
    input:
        raw=rules.fetch.output.raw,
    output:
        tif=f"{DATA}/{{region}}/labels.tif",
        gpkg=f"{DATA}/{{region}}/labels.gpkg",
    params:
        p=params_json("labels"),
    log:
        f"logs/{{region}}/labels.log",
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    shell:
        "python -m cropmap labels --params {params.p:q} --raw-dir {input.raw:q} --out-tif {output.tif:q}"
        " --out-gpkg {output.gpkg:q} --log {log:q}"


rule chips:
    """Enumerate chips (TorchGeo GridGeoSampler) with split and per-modality presence."""
    input:
        stack=rules.stack.output,
        labels=rules.labels.output.tif,
    output:
        f"{DATA}/{{region}}/chips.parquet",
    params:
        p=params_json("chips"),
    log:
        f"logs/{{region}}/chips.log",
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    shell:
        "python -m cropmap chips --params {params.p:q} --stack-dir {input.stack:q} --labels {input.labels:q}"
        " --out {output:q} --log {log:q}"
