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
        "../../envs/cropmap.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=60,
    shell:
        "python -m cropmap stack --params {params.p:q} --raw-dir {input.raw} --out-dir {output} > {log} 2>&1"
