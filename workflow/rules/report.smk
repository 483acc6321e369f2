rule metrics:
    """Held-out metrics for every non-empty subset of modalities."""
    input:
        model=f"{MODELS}/{{region}}/{TASK}/model.ckpt",
        stack=rules.stack.output,
        labels=rules.labels.output.tif,
        chips=rules.chips.output,
    output:
        f"{RESULTS}/{{region}}/metrics.csv",
    params:
        p=params_json("metrics"),
        tags="",
    log:
        f"logs/{{region}}/metrics.log",
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    shell:
        "python -m cropmap metrics --params {params.p:q} --model {input.model} --stack-dir {input.stack}"
        " --labels {input.labels} --chips {input.chips} --out {output} {params.tags} > {log} 2>&1"


rule coverage:
    """Nodata share, tiles without any sensor and months without data (coverage.json)."""
    input:
        map=f"{RESULTS}/{{region}}/map.tif",
        stack=rules.stack.output,
    output:
        f"{RESULTS}/{{region}}/coverage.json",
    params:
        p=params_json("coverage"),
    log:
        f"logs/{{region}}/coverage.log",
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    shell:
        "python -m cropmap coverage --params {params.p:q} --map {input.map} --stack-dir {input.stack}"
        " --out {output} > {log} 2>&1"


rule report:
    """HTML report of every region: metrics per sensor subset, availability, quicklook."""
    input:
        metrics=expand(f"{RESULTS}/{{region}}/metrics.csv", region=labelled_regions()),
        quicklooks=expand(f"{RESULTS}/{{region}}/quicklook.png", region=REGIONS),
        availability=expand(f"{DATA}/{{region}}/availability.json", region=REGIONS),
        expected=expand(f"{RESULTS}/{{region}}/expected_f1.tif", region=REGIONS),
        coverage=expand(f"{RESULTS}/{{region}}/coverage.json", region=REGIONS),
        summaries=sorted({report_files(r)["summary"] for r in REGIONS}),
    output:
        f"{RESULTS}/report.html",
    params:
        regions=lambda wc: dumps({r: report_files(r) for r in REGIONS}),
    log:
        "logs/report.log",
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    shell:
        "python -m cropmap report --regions {params.regions:q} --out {output} > {log} 2>&1"
