rule samples:
    """Read a training set's tables: samples on its season, classes, spatial groups and split."""
    input:
        # the tables: editing one rereads the set
        lambda wc: table_files(config, wc.region),
    output:
        f"{DATA}/{{region}}/samples.npz",
    params:
        p=params_json("samples"),
    log:
        f"logs/{{region}}/samples.log",
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        "python -m cropmap samples --params {params.p:q} --out {output:q} --log {log:q}"
