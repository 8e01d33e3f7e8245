import json,glob,sys
for f in sorted(glob.glob(sys.argv[1]), key=lambda f:int(f.split('_')[1])):
    d=json.load(open(f))
    print(f"{f[:-5]:16s} ok={d['completed']} fail={d['failed']} out={d['total_output_tokens']} dur={d['duration']:.2f} req/s={d['request_throughput']:.3f} tok/s={d['output_throughput']:.1f} ttft50={d['median_ttft_ms']:.1f} ttft99={d['p99_ttft_ms']:.1f} tpot50={d['median_tpot_ms']:.2f} tpot99={d['p99_tpot_ms']:.2f} itl50={d['median_itl_ms']:.2f}")
