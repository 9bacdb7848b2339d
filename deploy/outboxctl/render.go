package main

// Manifest tooling for deploy/deploy.sh: render fills the ${NAME}
// placeholders of a Cloud Run manifest, budget adds up the PostgreSQL
// connections the services can open at full scale.
//
// Rendering works on the parsed YAML, never on its text: a placeholder is
// replaced inside one scalar, and the encoder quotes the result as that
// scalar needs. So "Tom & Jerry", `"Ex" <a@b>`, "Ops: team", "a|b" and
// "Team #1" arrive in the manifest as they were typed, and no value can add a
// key, end a string or start a comment. Newlines and other control
// characters are refused.

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"regexp"
	"strconv"
	"strings"
	"unicode"

	"gopkg.in/yaml.v3"
)

var (
	placeholder = regexp.MustCompile(`\$\{([A-Z][A-Z0-9_]*)\}`)
	// identifier is what -set accepts: project, region, instance, network and
	// image names, digests. They also land inside the JSON of the
	// network-interfaces annotation, so no quotes, spaces or braces.
	identifier = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._:/@-]*$`)
)

// values maps placeholder names to their values.
type values map[string]string

// setFlag parses NAME=VALUE pairs into values, checking each value.
type setFlag struct {
	vals  values
	check func(name, value string) error
}

func (f setFlag) String() string { return "" }

func (f setFlag) Set(s string) error {
	name, value, ok := strings.Cut(s, "=")
	if !ok || !placeholder.MatchString("${"+name+"}") {
		return fmt.Errorf("want NAME=VALUE with NAME in capitals, not %q", s)
	}
	if err := f.check(name, value); err != nil {
		return err
	}
	f.vals[name] = value
	return nil
}

func checkIdentifier(name, value string) error {
	if !identifier.MatchString(value) {
		return fmt.Errorf("%s must be a plain name (letters, digits, . _ : / @ -), not %q", name, value)
	}
	return nil
}

func checkText(name, value string) error {
	for _, r := range value {
		if unicode.IsControl(r) || r == '\u2028' || r == '\u2029' {
			return fmt.Errorf("%s must be one line without control characters, not %q", name, value)
		}
	}
	return nil
}

// runRender is `outboxctl render [-set NAME=VALUE]... [-text NAME=VALUE]... FILE`.
func runRender(args []string, out io.Writer) error {
	vals := values{}
	fs := flag.NewFlagSet("render", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.Var(setFlag{vals, checkIdentifier}, "set", "NAME=VALUE, a plain name (project, region, image)")
	fs.Var(setFlag{vals, checkText}, "text", "NAME=VALUE, free text on one line (MAIL_FROM)")
	if err := fs.Parse(args); err != nil {
		return fmt.Errorf("%w: render: %v", errUsage, err)
	}
	if fs.NArg() != 1 {
		return fmt.Errorf("%w: render takes one manifest file", errUsage)
	}
	raw, err := os.ReadFile(fs.Arg(0))
	if err != nil {
		return fmt.Errorf("read manifest: %w", err)
	}
	rendered, err := render(raw, vals)
	if err != nil {
		return fmt.Errorf("render %s: %w", fs.Arg(0), err)
	}
	_, err = out.Write(rendered)
	return err
}

// render replaces every ${NAME} in the scalars of the YAML document raw.
func render(raw []byte, vals values) ([]byte, error) {
	var doc yaml.Node
	if err := yaml.Unmarshal(raw, &doc); err != nil {
		return nil, fmt.Errorf("parse: %w", err)
	}
	var missing []string
	var walk func(n *yaml.Node)
	walk = func(n *yaml.Node) {
		if n.Kind == yaml.ScalarNode && placeholder.MatchString(n.Value) {
			n.Value = placeholder.ReplaceAllStringFunc(n.Value, func(m string) string {
				name := m[2 : len(m)-1]
				v, ok := vals[name]
				if !ok {
					missing = append(missing, name)
				}
				return v
			})
			// A value is a string whatever it looks like ("0", "true").
			n.Tag, n.Style = "!!str", yaml.DoubleQuotedStyle
		}
		for _, c := range n.Content {
			walk(c)
		}
	}
	walk(&doc)
	if len(missing) > 0 {
		return nil, fmt.Errorf("no value for %s", strings.Join(missing, ", "))
	}
	var b bytes.Buffer
	enc := yaml.NewEncoder(&b)
	enc.SetIndent(2)
	if err := enc.Encode(&doc); err != nil {
		return nil, fmt.Errorf("encode: %w", err)
	}
	if err := enc.Close(); err != nil {
		return nil, fmt.Errorf("encode: %w", err)
	}
	return b.Bytes(), nil
}

// Connections a service opens besides its pool (DB_MAX_CONNS), per
// instance, by FUNCTION_TARGET: the relay's LISTEN connection.
var extraConns = map[string]int{"Relay": 1}

// serviceBudget is one service's share of the connection budget.
type serviceBudget struct {
	Name      string
	Instances int
	Pool      int
	Extra     int
}

func (s serviceBudget) total() int { return s.Instances * (s.Pool + s.Extra) }

// budgetManifest is the part of a Cloud Run service that sizes its
// connections.
type budgetManifest struct {
	Kind     string `yaml:"kind"`
	Metadata struct {
		Name string `yaml:"name"`
	} `yaml:"metadata"`
	Spec struct {
		Template struct {
			Metadata struct {
				Annotations map[string]string `yaml:"annotations"`
			} `yaml:"metadata"`
			Spec struct {
				Containers []struct {
					Env []struct {
						Name  string `yaml:"name"`
						Value string `yaml:"value"`
					} `yaml:"env"`
				} `yaml:"containers"`
			} `yaml:"spec"`
		} `yaml:"template"`
	} `yaml:"spec"`
}

// budgetOf reads a service manifest's maximum instances and connections per
// instance; jobs and other kinds return ok false.
func budgetOf(raw []byte) (b serviceBudget, ok bool, err error) {
	var m budgetManifest
	if err := yaml.Unmarshal(raw, &m); err != nil {
		return b, false, fmt.Errorf("parse: %w", err)
	}
	if m.Kind != "Service" {
		return b, false, nil
	}
	b.Name = m.Metadata.Name
	maxScale := m.Spec.Template.Metadata.Annotations["autoscaling.knative.dev/maxScale"]
	if b.Instances, err = strconv.Atoi(maxScale); err != nil || b.Instances < 1 {
		return b, false, fmt.Errorf("%s: autoscaling.knative.dev/maxScale must be set to a number: without it the instances, and their connections, have no bound", b.Name)
	}
	pool, target := "", ""
	for _, c := range m.Spec.Template.Spec.Containers {
		for _, e := range c.Env {
			switch e.Name {
			case "DB_MAX_CONNS":
				pool = e.Value
			case "FUNCTION_TARGET":
				target = e.Value
			}
		}
	}
	if b.Pool, err = strconv.Atoi(pool); err != nil || b.Pool < 1 {
		return b, false, fmt.Errorf("%s: DB_MAX_CONNS must be set to a number, so that the budget does not depend on a code default", b.Name)
	}
	b.Extra = extraConns[target]
	return b, true, nil
}

// runBudget is `outboxctl budget [-max-connections N] [-reserve N] FILE...`:
// it prints each service's connections at full scale and fails when their
// sum and the reserve exceed max_connections.
func runBudget(args []string, out io.Writer) error {
	fs := flag.NewFlagSet("budget", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	maxConns := fs.Int("max-connections", 100, "the Cloud SQL instance's max_connections")
	reserve := fs.Int("reserve", 10, "connections kept for others: 3 superuser slots, the migration job (2), outboxctl (5)")
	if err := fs.Parse(args); err != nil {
		return fmt.Errorf("%w: budget: %v", errUsage, err)
	}
	if fs.NArg() == 0 {
		return fmt.Errorf("%w: budget takes manifest files", errUsage)
	}
	var services []serviceBudget
	for _, file := range fs.Args() {
		raw, err := os.ReadFile(file)
		if err != nil {
			return fmt.Errorf("read manifest: %w", err)
		}
		b, ok, err := budgetOf(raw)
		if err != nil {
			return fmt.Errorf("%s: %w", file, err)
		}
		if ok {
			services = append(services, b)
		}
	}
	sum := printBudget(out, services, *reserve, *maxConns)
	if sum > *maxConns {
		return fmt.Errorf("%w: %d connections at full scale exceed max_connections %d: lower maxScale or DB_MAX_CONNS, or raise max_connections",
			errBudget, sum, *maxConns)
	}
	return nil
}

var errBudget = errors.New("connection budget exceeded")

// printBudget writes the table and returns the sum including the reserve.
func printBudget(out io.Writer, services []serviceBudget, reserve, maxConns int) int {
	fmt.Fprintln(out, "PostgreSQL connections at full scale:")
	sum := reserve
	for _, s := range services {
		extra := ""
		if s.Extra > 0 {
			extra = fmt.Sprintf(" + %d LISTEN", s.Extra)
		}
		fmt.Fprintf(out, "  %-11s %3d instances × (%d pooled%s) = %d\n", s.Name, s.Instances, s.Pool, extra, s.total())
		sum += s.total()
	}
	fmt.Fprintf(out, "  %-11s %d (superuser slots, migration job, outboxctl)\n", "reserve", reserve)
	fmt.Fprintf(out, "  total %d of max_connections %d\n", sum, maxConns)
	return sum
}
