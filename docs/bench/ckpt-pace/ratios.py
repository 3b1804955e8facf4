import re,sys,statistics as st
for f in sys.argv[1:]:
  d={}
  for l in open(f):
    m=re.match(r'(\S+) (\d+) .*p99 (\d+) µs without checkpoints, (\d+) µs with \d+ checkpoints of [\d.]+ MB \(([\d.]+) s',l)
    if m: d.setdefault(m[1],[]).append((int(m[4])/int(m[3]), float(m[5])))
  for k,v in sorted(d.items()):
    r=[x[0] for x in v]
    print(f.split('/')[-2],k, len(r), 'median %.2f'%st.median(r), '(%.2f-%.2f)'%(min(r),max(r)), 'ckpt s %.2f'%st.median([x[1] for x in v]), ' '.join('%.2f'%x for x in r))
