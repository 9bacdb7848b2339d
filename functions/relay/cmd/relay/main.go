// Command relay serves the relay function alone, as its Cloud Run service
// does: the HTTP trigger plus the LISTEN/poll loop.
package main

import (
	"github.com/outboxfn/outbox/functions/relay"
	"github.com/outboxfn/outbox/shared/serve"
)

func main() { serve.Main(relay.Function) }
