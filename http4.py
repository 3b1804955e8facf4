# odd HTTP/1.1 request forms: any 5xx, hang or crash?
import socket, sys, time
PORT=int(sys.argv[1]) if len(sys.argv)>1 else 21000
T=open('/tmp/auditA5/token').read().strip()
A=f'authorization: Bearer {T}\r\n'
cases={
 'options*': 'OPTIONS * HTTP/1.1\r\nhost: x\r\n\r\n',
 'connect': 'CONNECT 127.0.0.1:21000 HTTP/1.1\r\nhost: x\r\n\r\n',
 'get*': 'GET * HTTP/1.1\r\nhost: x\r\n\r\n',
 'trace': 'TRACE /v1/ping HTTP/1.1\r\nhost: x\r\n\r\n',
 'lower': 'get /v1/ping HTTP/1.1\r\nhost: x\r\n\r\n',
 'longmethod': 'G'*2000+' /v1/ping HTTP/1.1\r\nhost: x\r\n\r\n',
 'absolute': 'GET http://evil/v1/ping HTTP/1.1\r\nhost: x\r\n\r\n',
 'authority': 'GET 127.0.0.1:21000 HTTP/1.1\r\nhost: x\r\n\r\n',
 'many_segments': 'GET /v1/tenants/ix/tables/t/rows/'+'1/'*20000+'1 HTTP/1.1\r\nhost: x\r\n'+A+'\r\n',
 'many_qs': 'GET /v1/tenants/ix/watch?'+'&'.join(['tables=t']*8000)+' HTTP/1.1\r\nhost: x\r\n'+A+'\r\n',
 'qs_dup_from': 'GET /v1/tenants/ix/watch?from_lsn=1&from_lsn=2 HTTP/1.1\r\nhost: x\r\n'+A+'\r\n',
 'http10_ka': 'GET /v1/ping HTTP/1.0\r\nconnection: keep-alive\r\n\r\nGET /v1/ping HTTP/1.0\r\n\r\n',
 'no_host': 'GET /v1/ping HTTP/1.1\r\n\r\n',
 'two_hosts': 'GET /v1/ping HTTP/1.1\r\nhost: a\r\nhost: b\r\n\r\n',
 'te_identity': 'POST /v1/tenants/ix/ask HTTP/1.1\r\nhost: x\r\n'+A+'transfer-encoding: identity\r\ncontent-length: 2\r\n\r\n{}',
 'chunk_leading0': 'POST /v1/tenants/ix/ask HTTP/1.1\r\nhost: x\r\n'+A+'content-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n'+'0'*100+'2\r\n{}\r\n0\r\n\r\n',
 'chunk_neg': 'POST /v1/tenants/ix/ask HTTP/1.1\r\nhost: x\r\n'+A+'transfer-encoding: chunked\r\n\r\n-2\r\n{}\r\n0\r\n\r\n',
 'expect_bad': 'POST /v1/tenants/ix/ask HTTP/1.1\r\nhost: x\r\n'+A+'expect: 200-ok\r\ncontent-length: 2\r\n\r\n{}',
 'upgrade_ws': 'GET /v1/tenants/ix/watch HTTP/1.1\r\nhost: x\r\n'+A+'connection: upgrade\r\nupgrade: websocket\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n',
 'upgrade_h2c': 'GET /v1/ping HTTP/1.1\r\nhost: x\r\nconnection: upgrade, http2-settings\r\nupgrade: h2c\r\nhttp2-settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n',
 'space_before_colon': 'GET /v1/ping HTTP/1.1\r\nhost : x\r\n\r\n',
 'nul_in_header': 'GET /v1/ping HTTP/1.1\r\nhost: x\r\nx-a: a\x00b\r\n\r\n',
 'utf8_header': 'GET /v1/ping HTTP/1.1\r\nhost: x\r\nx-a: \u00e9\u00e9\r\n\r\n',
 'rid_long': 'GET /v1/ping HTTP/1.1\r\nhost: x\r\nx-request-id: '+'a'*129+'\r\n\r\n',
 'rid_dup': 'GET /v1/ping HTTP/1.1\r\nhost: x\r\nx-request-id: a\r\nx-request-id: b\r\n\r\n',
 'ct_weird': 'POST /v1/tenants/ix/ask HTTP/1.1\r\nhost: x\r\n'+A+'content-type: application/json; charset=utf-16\r\ncontent-length: 2\r\n\r\n{}',
 'ct_two': 'POST /v1/tenants/ix/ask HTTP/1.1\r\nhost: x\r\n'+A+'content-type: application/json\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\n{}',
 'body_on_get': 'GET /v1/tenants/ix/tables HTTP/1.1\r\nhost: x\r\n'+A+'content-length: 5\r\n\r\nhello',
 'body_on_get_big': 'GET /v1/tenants/ix/tables HTTP/1.1\r\nhost: x\r\n'+A+'content-length: 4000000\r\n\r\n'+'a'*4000000,
 'head_ask': 'HEAD /v1/tenants/ix/ask HTTP/1.1\r\nhost: x\r\n'+A+'\r\n',
 'delete_body': 'DELETE /v1/tenants/ix/tables/nonexist HTTP/1.1\r\nhost: x\r\n'+A+'content-length: 2\r\n\r\n{}',
 'utf16_body': 'POST /v1/tenants/ix/ask HTTP/1.1\r\nhost: x\r\n'+A+'content-type: application/json\r\ncontent-length: 6\r\n\r\n\xff\xfe{\x00}\x00',
 'obs_text_path': 'GET /v1/tenants/\xe9/usage HTTP/1.1\r\nhost: x\r\n'+A+'\r\n',
 'fragment': 'GET /v1/ping#frag HTTP/1.1\r\nhost: x\r\n\r\n',
 'dotdot_tenant': 'GET /v1/tenants/ix/../ix/usage HTTP/1.1\r\nhost: x\r\n'+A+'\r\n',
}
for name,raw in cases.items():
    s=socket.create_connection(('127.0.0.1',PORT)); s.settimeout(5)
    t=time.time()
    try:
        s.sendall(raw.encode('latin-1') if all(ord(c)<256 for c in raw) else raw.encode())
        buf=b''
        while True:
            d=s.recv(65536)
            if not d: break
            buf+=d
            if b'\r\n\r\n' in buf and (b'content-length: 0' in buf.lower() or buf.endswith(b'}') or buf.endswith(b'\r\n\r\n')) and name!='http10_ka': break
    except socket.timeout: buf+=b' <timeout>'
    except Exception as e: buf=repr(e).encode()
    s.close()
    lines=buf.split(b'\r\n')
    body=buf.split(b'\r\n\r\n',1)[1][:130] if b'\r\n\r\n' in buf else b''
    print(f'{name:18s} {lines[0][:40]!r} {time.time()-t:.2f}s {body!r}')
