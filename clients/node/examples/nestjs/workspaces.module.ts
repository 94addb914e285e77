// The module that provides WorkspacesService: import it into the application's module, and give the
// orchestrator's address through WORKSPACE_ORCHESTRATOR (or `WorkspacesModule.forRoot({ address })`).

import { type DynamicModule, Module } from '@nestjs/common';
import { WORKSPACES_OPTIONS, type WorkspacesOptions, WorkspacesService } from './workspaces.service.js';

@Module({
  providers: [
    { provide: WORKSPACES_OPTIONS, useFactory: (): WorkspacesOptions => ({ address: process.env.WORKSPACE_ORCHESTRATOR ?? '127.0.0.1:50051' }) },
    WorkspacesService,
  ],
  exports: [WorkspacesService],
})
export class WorkspacesModule {
  static forRoot(options: WorkspacesOptions): DynamicModule {
    return {
      module: WorkspacesModule,
      providers: [{ provide: WORKSPACES_OPTIONS, useValue: options }, WorkspacesService],
      exports: [WorkspacesService],
    };
  }
}
