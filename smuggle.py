import socket, time
TOKEN=open('/tmp/auditA5/token').read().strip()
A=f'authorization: Bearer {TOKEN}\r\n'
P='/v1/tenants/nb1/tables/p/rows'
body=b'{"ops":[{"upsert":{"id":7,"v":"smug"}}]}'
G=f'GET /v1/tenants/nb1/tables/p/rows/1 HTTP/1.1\r\nhost: x\r\n{A}\r\n'.encode()
def raw(data, wait=1.5):
    s=socket.create_connection(('127.0.0.1',20000)); s.settimeout(wait); s.sendall(data); out=b''
    try:
        while True:
            b=s.recv(65536)
            if not b: out+=b'<EOF>'; break
            out+=b
    except socket.timeout: out+=b'<timeout>'
    s.close(); return out
L=len(body)
tests={
 'TE twice': f'POST {P} HTTP/1.1\r\nhost: x\r\n{A}transfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n\r\n'.encode()+b'%x\r\n'%L+body+b'\r\n0\r\n\r\n'+G,
 'TE chunked,chunked': f'POST {P} HTTP/1.1\r\nhost: x\r\n{A}transfer-encoding: chunked, chunked\r\n\r\n'.encode()+b'%x\r\n'%L+body+b'\r\n0\r\n\r\n'+G,
 'TE identity,chunked': f'POST {P} HTTP/1.1\r\nhost: x\r\n{A}transfer-encoding: identity, chunked\r\n\r\n'.encode()+b'%x\r\n'%L+body+b'\r\n0\r\n\r\n'+G,
 'TE xchunked': f'POST {P} HTTP/1.1\r\nhost: x\r\n{A}transfer-encoding: xchunked\r\ncontent-length: {L}\r\n\r\n'.encode()+body+G,
 'TE tab': f'POST {P} HTTP/1.1\r\nhost: x\r\n{A}transfer-encoding:\tchunked\r\n\r\n'.encode()+b'%x\r\n'%L+body+b'\r\n0\r\n\r\n'+G,
 'CL list "n, n"': f'POST {P} HTTP/1.1\r\nhost: x\r\n{A}content-length: {L}, {L}\r\n\r\n'.encode()+body+G,
 'CL +n': f'POST {P} HTTP/1.1\r\nhost: x\r\n{A}content-length: +{L}\r\n\r\n'.encode()+body+G,
 'CL 0n': f'POST {P} HTTP/1.1\r\nhost: x\r\n{A}content-length: 0{L}\r\n\r\n'.encode()+body+G,
 'CL space name': f'POST {P} HTTP/1.1\r\nhost: x\r\n{A}content-length : {L}\r\n\r\n'.encode()+body+G,
 'obs-fold': f'POST {P} HTTP/1.1\r\nhost: x\r\n{A}content-length: \r\n {L}\r\n\r\n'.encode()+body+G,
 'bare LF': f'POST {P} HTTP/1.1\nhost: x\n{A[:-2]}\ncontent-length: {L}\n\n'.encode()+body+G,
 'GET with body CL': f'GET /v1/tenants/nb1/tables/p/rows/1 HTTP/1.1\r\nhost: x\r\n{A}content-length: {len(G)}\r\n\r\n'.encode()+G,
 'chunk size with ws': f'POST {P} HTTP/1.1\r\nhost: x\r\n{A}transfer-encoding: chunked\r\n\r\n'.encode()+b'%x \r\n'%L+body+b'\r\n0\r\n\r\n'+G,
 'chunk LF only': f'POST {P} HTTP/1.1\r\nhost: x\r\n{A}transfer-encoding: chunked\r\n\r\n'.encode()+b'%x\n'%L+body+b'\n0\n\n'+G,
 'host twice': f'GET /v1/ping HTTP/1.1\r\nhost: a\r\nhost: b\r\n\r\n'.encode(),
 'no host': f'GET /v1/ping HTTP/1.1\r\n\r\n'.encode(),
 'method lowercase': f'get /v1/ping HTTP/1.1\r\nhost: x\r\n\r\n'.encode(),
 'HTTP/1.2': f'GET /v1/ping HTTP/1.2\r\nhost: x\r\n\r\n'.encode(),
 'HTTP/2 PRI': b'PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n',
}
import re
for k,d in tests.items():
    o=raw(d)
    sts=re.findall(rb'HTTP/1\.1 (\d+)',o)
    print(f'{k:22s}', [x.decode() for x in sts], o[-120:].replace(b'\r\n',b'|'))
