// Command createuser serves the createuser function alone, as its Cloud Run
// service does.
package main

import (
	"github.com/outboxfn/outbox/functions/createuser"
	"github.com/outboxfn/outbox/shared/serve"
)

func main() { serve.Main(createuser.Function) }
