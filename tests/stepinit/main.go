// Command stepinit makes a PKI as `step ca init` does, with the library that command calls
// (github.com/smallstep/certificates/pki, from Debian's packages): a root and an
// intermediate CA, their keys encrypted with the password as step encrypts them, one JWK
// provisioner whose private key is encrypted with the same password, config/ca.json,
// config/defaults.json and the templates, all under $STEPPATH.
//
// Usage: STEPPATH=DIR stepinit NAME DNS[,DNS...] ADDRESS PROVISIONER < PASSWORD
//
// It prints one JSON line: the paths of ca.json and of the root certificate, and the
// root's SHA-256 fingerprint. Usage errors print one line on stderr and exit with status 2;
// a failure exits with status 1. tests/test_step_sdk.py runs it.
package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/smallstep/certificates/cas/apiv1"
	"github.com/smallstep/certificates/pki"

	// The software CA service that `step ca init` uses by default.
	_ "github.com/smallstep/certificates/cas/softcas"
)

func fail(code int, format string, args ...any) {
	fmt.Fprintf(os.Stderr, "stepinit: "+format+"\n", args...)
	os.Exit(code)
}

func main() {
	if len(os.Args) != 5 || os.Getenv("STEPPATH") == "" {
		fail(2, "usage: STEPPATH=DIR stepinit NAME DNS[,DNS...] ADDRESS PROVISIONER < PASSWORD")
	}
	name, dns, address, provisioner := os.Args[1], os.Args[2], os.Args[3], os.Args[4]
	line, err := bufio.NewReader(os.Stdin).ReadString('\n')
	if err != nil && err != io.EOF {
		fail(2, "reading the password: %v", err)
	}
	password := []byte(strings.TrimRight(line, "\r\n"))
	if len(password) == 0 {
		fail(2, "the password on standard input is empty")
	}

	p, err := pki.New(
		apiv1.Options{Type: apiv1.SoftCAS, IsCreator: true},
		pki.WithAddress(address),
		pki.WithDNSNames(strings.Split(dns, ",")),
		pki.WithProvisioner(provisioner),
	)
	if err != nil {
		fail(1, "%v", err)
	}
	if err := p.GenerateKeyPairs(password); err != nil {
		fail(1, "provisioner key: %v", err)
	}
	root, err := p.GenerateRootCertificate(name, name, name, password)
	if err != nil {
		fail(1, "root: %v", err)
	}
	if err := p.GenerateIntermediateCertificate(name, name, name, root, password); err != nil {
		fail(1, "intermediate: %v", err)
	}
	// Save prints what it wrote, as step does; that goes to stderr, the JSON to stdout.
	stdout := os.Stdout
	os.Stdout = os.Stderr
	err = p.Save()
	os.Stdout = stdout
	if err != nil {
		fail(1, "save: %v", err)
	}
	out, err := json.Marshal(map[string]string{
		"config":      p.GetCAConfigPath(),
		"root":        p.Root[0],
		"fingerprint": p.GetRootFingerprint(),
	})
	if err != nil {
		fail(1, "%v", err)
	}
	fmt.Println(string(out))
}
