rule stack:
    """Align each fetched modality onto the region grid (one GeoTIFF per modality)."""
    input:
        raw=rules.fetch.output.raw,
    output:
        directory(f"{DATA}/{{region}}/stack"),
    params:
        p=params_json("stack"),
    log:
        f"logs/{{region}}/stack.log",
    conda:
        CONDA_ENV
    threads: min(4, workflow.cores)
    resources:
        mem_mb=4000,
        runtime=60,
    shell:
        "python -m cropmap stack --params {params.p:q} --raw-dir {input.raw:q} --out-dir {output:q} --threads {threads}"
        " --log {log:q}"
