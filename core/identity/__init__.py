"""Workload identity: the certificate authority, identity names, tokens and the proxy's identity client.

Everything here is a pure function of its inputs (CSR bytes, token verdicts, the issuer, ``now``), so the
identity service (an adapter on grpcio) and the simulator run the same code.
"""
